"""From noise to latents with a DiT: the solver, guidance and time units of a checkpoint's objective.

    z = make_latents(model, objective, labels, ImageNoise(seed, indices), SolveConfig(steps=50),
                     latent_shape=(4, 32, 32), device=device, precision="bf16")

The one path that `latentdit sample`, the training grid hook and the benchmark all run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from foundation.precision import autocast
from sampler.config import SolveConfig
from sampler.errors import SamplerError
from sampler.guidance import guided
from sampler.plan import ImageNoise
from sampler.solvers import DEFAULT_SOLVER, SOLVERS, Solver, solvers_for
from trainer.model import DiT
from trainer.objective import DDPM, FlowMatching, Objective


def pick_solver(cfg: SolveConfig, objective: Objective) -> tuple[str, Solver, dict[str, Any]]:
    """(name, solver, keyword arguments) for the checkpoint's objective; refuses misfits."""
    name = cfg.sampler or DEFAULT_SOLVER[objective.KIND]
    solver = SOLVERS[name]
    if solver.kind != objective.KIND:
        raise SamplerError(
            f"--sampler {name} is for {solver.kind} models; this checkpoint is "
            f"{objective.KIND}: use one of {', '.join(solvers_for(objective.KIND))}"
        )
    if isinstance(objective, FlowMatching):
        return name, solver, {"shift": cfg.shift}
    if cfg.shift != 1.0:
        raise SamplerError("--shift applies to flow-matching samplers only; drop it")
    if cfg.steps > objective.num_steps:
        raise SamplerError(
            f"--steps {cfg.steps}: this DDPM has {objective.num_steps} steps; use at most that"
        )
    kwargs: dict[str, Any] = {"alphas_cumprod": objective.alphas_cumprod}
    if name == "ddim":
        kwargs["eta"] = cfg.eta
    return name, solver, kwargs


def _time_units(objective: Objective) -> tuple[float, float]:
    """(model time per unit of solver time, solver time per unit of t in [0, 1])."""
    if isinstance(objective, DDPM):
        return 1.0, float(objective.num_steps)
    return objective.time_scale, 1.0


def make_latents(
    model: DiT,
    objective: Objective,
    labels: Tensor,
    noise: ImageNoise,
    cfg: SolveConfig,
    *,
    latent_shape: tuple[int, ...],
    device: torch.device,
    precision: str,
) -> Tensor:
    """Solve from each image's own noise to normalized latents (B, C, H, W), float32."""
    _, solver, kwargs = pick_solver(cfg, objective)
    to_model_time, per_t = _time_units(objective)

    def net_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        with autocast(device, precision):
            return model(x, t * to_model_time, y).float()

    interval = None if cfg.cfg_interval is None else tuple(v * per_t for v in cfg.cfg_interval)
    model_fn = guided(
        net_fn, labels.to(device), scale=cfg.cfg, null_class=model.null_class, interval=interval
    )
    if solver.takes_noise:
        kwargs["noise"] = noise
    x = noise.initial(latent_shape, device)
    return solver.fn(model_fn, x, cfg.steps, disable=True, **kwargs)
