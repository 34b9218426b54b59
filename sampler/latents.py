"""From noise to latents with a DiT: the solver, guidance and time units of a checkpoint's objective.

    z = make_latents(model, objective, labels, ImageNoise(seed, indices), SolveConfig(steps=50),
                     latent_shape=(4, 32, 32), device=device, precision="bf16")

The one path that `latentdit sample`, the training grid hook and the benchmark all run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from foundation.precision import autocast
from sampler.errors import SamplerError
from sampler.guidance import guided
from sampler.plan import ImageNoise
from sampler.solvers import DEFAULT_SOLVER, SOLVERS, SPACINGS, VARIANCES, Solver, solvers_for
from sampler.solvers import ddpm_timesteps as solver_times
from trainer.model import DiT
from trainer.objective import DDPM, FlowMatching, Objective


@dataclass(frozen=True, kw_only=True)
class SolveConfig:
    """How latents are made from noise."""

    sampler: str | None = None
    """Solver name (see `SOLVERS`); None: heun for flow matching, dpm++2m for DDPM."""
    steps: int = 50
    """Solver steps (Heun makes two model calls per step)."""
    cfg: float = 1.0
    """Guidance scale: uncond + cfg (cond - uncond) on all channels; 1 means no guidance."""
    cfg_channels: int | None = None
    """Guide only the first N latent channels (3 reproduces the published DiT/SiT numbers); None: all."""
    cfg_interval: tuple[float, float] | None = None
    """Guide only for t in [lo, hi] (t in [0, 1], 1 = noise; DDPM: step / T); None: always."""
    shift: float = 1.0
    """SD3 timestep shift for flow solvers (1 = none)."""
    eta: float = 0.0
    """DDIM's eta (0 = deterministic)."""
    variance: str | None = None
    """DDPM sampler variance: fixed-small, fixed-large or learned; None: learned for learn_sigma models."""
    spacing: str = "trailing"
    """DDPM/DDIM timesteps: trailing (ours) or official (DiT's space_timesteps: "N", "ddimN")."""
    diffusion: float = 1.0
    """Euler-Maruyama diffusion w(t) = diffusion * t (SiT's sigma form with norm n: 2 n)."""
    last_step: float | None = None
    """Euler-Maruyama: size of a last, noise-free step to t = 0 (SiT: 0.04); None: uniform steps."""

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.shift > 0, f"--shift must be > 0, got {self.shift}"),
            (self.cfg >= 0, f"--cfg must be >= 0, got {self.cfg}"),
            (
                self.sampler is None or self.sampler in SOLVERS,
                f"--sampler {self.sampler!r} is not one of {', '.join(SOLVERS)}",
            ),
            (
                self.variance is None or self.variance in VARIANCES,
                f"--variance {self.variance!r} is not one of {', '.join(VARIANCES)}",
            ),
            (self.spacing in SPACINGS, f"--spacing {self.spacing!r} is not one of {', '.join(SPACINGS)}"),
            (self.cfg_channels is None or self.cfg_channels >= 1, f"--cfg-channels must be >= 1, got {self.cfg_channels}"),
            (self.diffusion >= 0, f"--diffusion must be >= 0, got {self.diffusion}"),
            (self.last_step is None or 0 < self.last_step < 1, f"--last-step must be in (0, 1), got {self.last_step}"),
        ]  # fmt: skip
        if self.cfg_interval is not None:
            lo, hi = self.cfg_interval
            checks.append(
                (0 <= lo <= hi <= 1, f"--cfg-interval needs 0 <= lo <= hi <= 1, got {lo} {hi}")
            )
        for ok, message in checks:
            if not ok:
                raise SamplerError(message)


@dataclass(frozen=True)
class Protocol:
    """A published sampling protocol: the SolveConfig values it sets, and where they come from."""

    solve: dict[str, Any]
    source: str


PROTOCOLS: dict[str, Protocol] = {
    "dit-fid": Protocol(
        {"sampler": "ddpm", "steps": 250, "cfg": 1.5, "cfg_channels": 3, "variance": "learned",
         "spacing": "official"},
        "DiT-XL/2 256px, FID-50K 2.27 (Peebles & Xie 2023, Table 4): facebookresearch/DiT "
        "sample_ddp.py defaults (250 DDPM steps of create_diffusion('250'), learned sigma, "
        "--cfg-scale 1.5, sd-vae-ft-ema) and models.py forward_with_cfg (guidance on 3 channels)",
    ),
    "sit-fid": Protocol(
        {"sampler": "euler-maruyama", "steps": 250, "cfg": 1.5, "cfg_channels": 3,
         "diffusion": 2.0, "last_step": 0.04},
        "SiT-XL/2 256px, FID-50K 2.06 (Ma et al. 2024; willisma/SiT README): sample_ddp.py SDE "
        "defaults (Euler, --diffusion-form sigma, --diffusion-norm 1 = our diffusion 2, "
        "--last-step Mean of size 0.04, 250 steps), --cfg-scale 1.5, guidance on 3 channels",
    ),
}  # fmt: skip


def protocol_solve(name: str, given: dict[str, Any] | None = None) -> SolveConfig:
    """The SolveConfig of a protocol; `given` (options set explicitly) win over it."""
    if name not in PROTOCOLS:
        raise SamplerError(f"--protocol {name!r} is not one of {', '.join(PROTOCOLS)}")
    return SolveConfig(**{**PROTOCOLS[name].solve, **(given or {})})


def pick_solver(
    cfg: SolveConfig, objective: Objective, *, learn_sigma: bool = False
) -> tuple[str, Solver, dict[str, Any]]:
    """(name, solver, keyword arguments) for the checkpoint's objective; refuses misfits.

    `learn_sigma`: the model outputs a variance too (what "learned" variance needs).
    """
    name = cfg.sampler or DEFAULT_SOLVER[objective.KIND]
    solver = SOLVERS[name]
    if solver.kind != objective.KIND:
        raise SamplerError(
            f"--sampler {name} is for {solver.kind} models; this checkpoint is "
            f"{objective.KIND}: use one of {', '.join(solvers_for(objective.KIND))}"
        )
    if isinstance(objective, FlowMatching):
        if name != "euler-maruyama" and (cfg.diffusion != 1.0 or cfg.last_step is not None):
            raise SamplerError(
                "--diffusion and --last-step apply to euler-maruyama only; drop them"
            )
        if cfg.variance is not None or cfg.spacing != "trailing":
            raise SamplerError("--variance and --spacing apply to DDPM samplers only; drop them")
        kwargs = {"shift": cfg.shift}
        if name == "euler-maruyama":
            kwargs.update(diffusion=cfg.diffusion, last_step=cfg.last_step)
        return name, solver, kwargs
    if cfg.shift != 1.0:
        raise SamplerError("--shift applies to flow-matching samplers only; drop it")
    if cfg.diffusion != 1.0 or cfg.last_step is not None:
        raise SamplerError("--diffusion and --last-step apply to euler-maruyama only; drop them")
    if cfg.steps > objective.num_steps:
        raise SamplerError(
            f"--steps {cfg.steps}: this DDPM has {objective.num_steps} steps; use at most that"
        )
    kwargs: dict[str, Any] = {"alphas_cumprod": objective.alphas_cumprod, "spacing": cfg.spacing}
    if name == "ddim":
        kwargs["eta"] = cfg.eta
    if name == "ddpm":
        kwargs["variance"] = cfg.variance or ("learned" if learn_sigma else "fixed-small")
        if kwargs["variance"] == "learned" and not learn_sigma:
            raise SamplerError(
                "--variance learned needs a model with learn_sigma (a variance output); this one "
                "has none: use fixed-small or fixed-large"
            )
    elif cfg.variance is not None:
        raise SamplerError(f"--variance applies to the ddpm sampler only, not {name}; drop it")
    try:
        solver_times(objective.num_steps, cfg.steps, cfg.spacing, ddim=name == "ddim")
    except ValueError as e:
        raise SamplerError(f"--steps {cfg.steps} --spacing {cfg.spacing}: {e}") from None
    return name, solver, kwargs


def _per_t(objective: Objective) -> float:
    """Solver time per unit of t in [0, 1] (1 = noise)."""
    return float(objective.num_steps) if isinstance(objective, DDPM) else 1.0


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
    """Solve from each image's own noise to normalized latents (B, C, H, W), float32.

    A learn_sigma model's variance output reaches only the ddpm sampler with learned variance
    (and is never guided); every other solver sees the prediction alone.
    """
    learn_sigma = bool(model.config.get("learn_sigma"))
    _, solver, kwargs = pick_solver(cfg, objective, learn_sigma=learn_sigma)
    keep_sigma = learn_sigma and kwargs.get("variance") == "learned"
    channels = model.config["in_channels"]
    sign = objective.velocity_sign if isinstance(objective, FlowMatching) else 1.0

    def net_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        with autocast(device, precision):
            out = model(x, objective.model_time(t), y).float()
        return sign * (out if keep_sigma else out[:, :channels])

    per_t = _per_t(objective)
    interval = None if cfg.cfg_interval is None else tuple(v * per_t for v in cfg.cfg_interval)
    model_fn = guided(
        net_fn, labels.to(device), scale=cfg.cfg, null_class=model.null_class, interval=interval,
        channels=min(cfg.cfg_channels or channels, channels),
    )  # fmt: skip
    if solver.takes_noise:
        kwargs["noise"] = noise
    x = noise.initial(latent_shape, device)
    return solver.fn(model_fn, x, cfg.steps, disable=True, **kwargs)
