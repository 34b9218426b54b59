"""From noise to latents with a DiT: the solver, guidance and time units of a checkpoint's objective.

    z = make_latents(model, objective, labels, ImageNoise(seed, indices), SolveConfig(steps=50),
                     latent_shape=(4, 32, 32), device=device, precision="bf16")

The one path that `latentdit sample`, the training grid hook and the benchmark all run.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from foundation.precision import autocast
from sampler.config import SolveConfig
from sampler.errors import SamplerError
from sampler.guidance import guided
from sampler.inference import InferenceModel
from sampler.plan import ImageNoise, to_device
from sampler.solver_base import Callback
from sampler.solvers import DEFAULT_SOLVER, SOLVERS, Solver, solvers_for, solvers_taking
from sampler.solvers import ddpm_timesteps as solver_times
from trainer.model import REG_KEY, DiT
from trainer.objective import DDPM, FlowMatching, Objective
from trainer.reg import pack, unpack

SOLVE_DEFAULTS = {f.name: f.default for f in fields(SolveConfig)}


def pick_solver(
    cfg: SolveConfig, objective: Objective, *, learn_sigma: bool = False, class_token: bool = False
) -> tuple[str, Solver, dict[str, Any]]:
    """(name, solver, keyword arguments) for the checkpoint's objective; refuses misfits.

    The keywords are the options the solver's registry entry names; an option set away from its
    default for a solver that does not take it is refused. `learn_sigma`: the model outputs a
    variance too (what "learned" variance needs). `class_token`: a REG model (`trainer.reg`),
    whose state is its latents and class token together.
    """
    if class_token and cfg.cfg_channels is not None:
        raise SamplerError(
            f"--cfg-channels {cfg.cfg_channels} guides some latent channels; a REG model's state "
            "is its latents and class token together, guided whole: drop it (and protocols that "
            "set it: dit-fid, sit-fid)"
        )
    name = cfg.sampler or DEFAULT_SOLVER[objective.KIND]
    solver = SOLVERS[name]
    if solver.kind != objective.KIND:
        raise SamplerError(
            f"--sampler {name} is for {solver.kind} models; this checkpoint is "
            f"{objective.KIND}: use one of {', '.join(solvers_for(objective.KIND))}"
        )
    if isinstance(objective, FlowMatching) and (
        cfg.variance is not None or cfg.spacing != "trailing"
    ):
        raise SamplerError("--variance and --spacing apply to DDPM samplers only; drop them")
    if isinstance(objective, DDPM) and cfg.shift != 1.0:
        raise SamplerError("--shift applies to flow-matching samplers only; drop it")
    for option in sorted({o for s in SOLVERS.values() for o in s.options} - set(solver.options)):
        if getattr(cfg, option) != SOLVE_DEFAULTS[option]:
            takers = solvers_taking(option)
            raise SamplerError(
                f"--{option.replace('_', '-')} applies to the {', '.join(takers)} "
                f"sampler{'s' if len(takers) > 1 else ''} only, not {name}; drop it"
            )
    kwargs: dict[str, Any] = {option: getattr(cfg, option) for option in solver.options}
    if isinstance(objective, FlowMatching):
        return name, solver, kwargs
    if cfg.steps > objective.num_steps:
        raise SamplerError(
            f"--steps {cfg.steps}: this DDPM has {objective.num_steps} steps; use at most that"
        )
    kwargs["alphas_cumprod"] = objective.alphas_cumprod
    if "variance" in kwargs:
        kwargs["variance"] = cfg.variance or ("learned" if learn_sigma else "fixed-small")
        if kwargs["variance"] == "learned" and not learn_sigma:
            raise SamplerError(
                "--variance learned needs a model with learn_sigma (a variance output); this one "
                "has none: use fixed-small or fixed-large"
            )
    try:
        solver_times(objective.num_steps, cfg.steps, cfg.spacing, ddim=name == "ddim")
    except ValueError as e:
        raise SamplerError(f"--steps {cfg.steps} --spacing {cfg.spacing}: {e}") from None
    return name, solver, kwargs


def _per_t(objective: Objective) -> float:
    """Solver time per unit of t in [0, 1] (1 = noise)."""
    return float(objective.num_steps) if isinstance(objective, DDPM) else 1.0


def make_latents(
    model: DiT | InferenceModel,
    objective: Objective,
    labels: Tensor,
    noise: ImageNoise,
    cfg: SolveConfig,
    *,
    latent_shape: tuple[int, ...],
    device: torch.device,
    precision: str,
    callback: Callback | None = None,
) -> Tensor:
    """Solve from each image's own noise to normalized latents (B, C, H, W), float32.

    `model` is the DiT or an `InferenceModel` (compiled, cast weights); `callback` goes to the
    solver. A learn_sigma model's variance output reaches only the ddpm sampler with learned
    variance (and is never guided); every other solver sees the prediction alone. A REG model
    solves for its latents and class token together (`trainer.reg`): each image's noise draws its
    latents, then its class token; the latents are returned.
    """
    learn_sigma, token = bool(model.config.get("learn_sigma")), model.config.get(REG_KEY)
    _, solver, kwargs = pick_solver(
        cfg, objective, learn_sigma=learn_sigma, class_token=bool(token)
    )
    keep_sigma = learn_sigma and kwargs.get("variance") == "learned"
    channels = model.config["in_channels"]
    sign = objective.velocity_sign if isinstance(objective, FlowMatching) else 1.0

    def net_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        with autocast(device, precision):
            out = model(x, objective.model_time(t), y).float()
        return sign * (out if keep_sigma or token else out[:, :channels])

    per_t = _per_t(objective)
    interval = None if cfg.cfg_interval is None else tuple(v * per_t for v in cfg.cfg_interval)
    model_fn = guided(
        net_fn, to_device(labels, device), scale=cfg.cfg, null_class=model.null_class, interval=interval,
        channels=None if token else min(cfg.cfg_channels or channels, channels),
    )  # fmt: skip
    if solver.takes_noise:
        kwargs["noise"] = noise
    x = noise.initial(latent_shape, device)
    if token:
        x = pack(x, noise(x.new_empty(len(x), token)))
    x = solver.fn(model_fn, x, cfg.steps, callback=callback, disable=True, **kwargs)
    return unpack(x, latent_shape)[0] if token else x
