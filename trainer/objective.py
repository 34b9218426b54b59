"""Training objectives as small frozen dataclasses with pure loss functions.

Flow matching (the default; Lipman et al. 2023, Liu et al. 2023, SD3 = Esser et al. 2024):
    x_t = (1 - t) x0 + t eps,  t in [0, 1] (t=0 data, t=1 noise),  target v = eps - x0,
    model time = 1000 t. With `reverse_time` (SiT's convention, Ma et al. 2024): model time =
    time_scale (1 - t), so 0 is noise, and the target is x0 - eps (imported SiT models: scale 1).
DDPM (Ho et al. 2020): 1000 steps, linear or cosine betas, epsilon prediction,
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,  model time = the integer step t as a float.
    With `learn_sigma` the model also outputs the variance and trains with DiT's hybrid loss
    L_simple + L_vlb (`trainer.vlb`).

Every objective has `loss(model_fn, x0, y, generator)`, `to_meta()` and `from_meta(dict)`;
`objective_from_meta` rebuilds whichever one a checkpoint names. `model_fn(x_t, t, y)` is the DiT.
A loss is a `Loss`: the value backward takes, and its named terms for the log (the MSE alone:
{"mse"}; DDPM with a learned variance: {"mse", "vlb"}).

Randomness: with `total` > len(x0), t and eps are drawn for `total` rows and rows
`offset:offset+len(x0)` are used, so ranks that seed one generator alike draw one global batch
and the result does not depend on how the batch is split across ranks.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from foundation.errors import LatentditError
from latent_store.arrays import LATENTS
from trainer.vlb import hybrid_terms

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

FLOW_TIME_SCALE = 1000.0  # model time = 1000 t, the range DiT's timestep features were built for
DDPM_STEPS = 1000
LINEAR_BETAS = (1e-4, 0.02)  # Ho et al. 2020, section 4
COSINE_S = 0.008  # Nichol & Dhariwal 2021, eq. 17
COSINE_MAX_BETA = 0.999  # Nichol & Dhariwal 2021: betas clipped to avoid a singularity at t=T
LOGIT_NORMAL = (0.0, 1.0)  # (m, s) of SD3's logit-normal timestep density, its best setting
DEFAULT_P_UNCOND = 0.1  # label dropout for classifier-free guidance (Ho & Salimans 2022)


class ObjectiveError(LatentditError):
    """An objective name or setting that latentdit does not know."""


class Loss(NamedTuple):
    """A training loss: its value (scalar float32, what backward takes) and its named terms
    (scalars, their sum or mix is `value`), which the trainer logs."""

    value: torch.Tensor
    terms: dict[str, torch.Tensor]


def _draw(
    shape: tuple[int, ...], total: int | None, offset: int, fn: Callable[[tuple[int, ...]], Any]
) -> torch.Tensor:
    """Draw `total` rows with fn(shape) and keep rows offset:offset+shape[0]."""
    rows = shape[0]
    full = fn((total or rows, *shape[1:]))
    return full[offset : offset + rows]


def drop_labels(
    y: torch.Tensor,
    p_uncond: float,
    null_class: int,
    generator: torch.Generator,
    *,
    offset: int = 0,
    total: int | None = None,
) -> torch.Tensor:
    """Replace each label by `null_class` with probability `p_uncond` (classifier-free guidance)."""
    u = _draw(
        tuple(y.shape), total, offset, lambda s: torch.rand(s, generator=generator, device=y.device)
    )
    return torch.where(u < p_uncond, torch.full_like(y, null_class), y)


def _noise_like(x0: torch.Tensor, generator: torch.Generator, offset: int, total: int | None):
    def randn(s):
        return torch.randn(s, generator=generator, device=x0.device, dtype=x0.dtype)

    return _draw(tuple(x0.shape), total, offset, randn)


class _MSEObjective(ABC):
    """The shared loss: mean squared error between the model output and the objective's target."""

    @abstractmethod
    def corrupt(self, x0, generator, *, offset=0, total=None):
        """(x_t, model time t, target) for clean latents x0."""

    def loss(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        *,
        offset: int = 0,
        total: int | None = None,
    ) -> Loss:
        """The loss (scalar float32) and its terms for clean latents x0 (B, C, H, W) and labels
        y (B,)."""
        x_t, t, target = self.corrupt(x0, generator, offset=offset, total=total)
        return self.loss_of(model_fn(x_t, t, y).float(), x0=x0, x_t=x_t, t=t, target=target)

    def batch_loss(
        self,
        model_fn: ModelFn,
        batch: dict[str, torch.Tensor],
        y: torch.Tensor,
        generator: torch.Generator,
        *,
        offset: int = 0,
        total: int | None = None,
    ) -> Loss:
        """The loss of a named batch (`trainer.data`): of its latents. (`trainer.repa.Alignment`
        adds REPA's loss on its features.)"""
        return self.loss(model_fn, batch[LATENTS], y, generator, offset=offset, total=total)

    def loss_of(self, out, *, x0, x_t, t, target) -> Loss:
        """The loss of model output `out` at (x_t, t), made from x0 with `target`."""
        mse = F.mse_loss(out, target.float())
        return Loss(mse, {"mse": mse.detach()})


@dataclass(frozen=True, kw_only=True)
class FlowMatching(_MSEObjective):
    """Linear-path flow matching with velocity prediction (see the module docstring)."""

    KIND: ClassVar[str] = "flow_matching"
    TIMESTEPS: ClassVar[tuple[str, ...]] = ("logit_normal", "uniform")

    timesteps: str = "logit_normal"
    """How training times t are drawn: "logit_normal" (SD3, m=0, s=1) or "uniform" on [0, 1]."""
    time_scale: float = FLOW_TIME_SCALE
    """Model time = time_scale * t (with reverse_time: time_scale * (1 - t))."""
    reverse_time: bool = False
    """SiT's convention: the model takes time_scale (1 - t) (0 = noise) and predicts x0 - eps."""

    def __post_init__(self) -> None:
        if self.timesteps not in self.TIMESTEPS:
            raise ObjectiveError(
                f"flow-matching timesteps {self.timesteps!r} is not one of {self.TIMESTEPS}"
            )

    def sample_t(self, shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
        """Training times t in [0, 1] (float32)."""
        if self.timesteps == "uniform":
            return torch.rand(shape, generator=generator, device=device)
        m, s = LOGIT_NORMAL
        return torch.sigmoid(m + s * torch.randn(shape, generator=generator, device=device))

    def corrupt(
        self,
        x0: torch.Tensor,
        generator: torch.Generator,
        *,
        offset: int = 0,
        total: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, model time, target velocity eps - x0) for clean latents x0."""
        t = _draw((x0.shape[0],), total, offset, lambda s: self.sample_t(s, generator, x0.device))
        eps = _noise_like(x0, generator, offset, total)
        t_ = t.view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
        return (1 - t_) * x0 + t_ * eps, self.model_time(t), self.velocity_sign * (eps - x0)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The model's time input for path times t in [0, 1] (1 = noise)."""
        return self.time_scale * ((1 - t) if self.reverse_time else t)

    @property
    def velocity_sign(self) -> float:
        """+1 when the model predicts eps - x0, -1 when it predicts x0 - eps (reverse_time)."""
        return -1.0 if self.reverse_time else 1.0

    def to_meta(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "path": "linear",
            "prediction": "velocity",
            "t0": "noise" if self.reverse_time else "data",
            **asdict(self),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> FlowMatching:
        return cls(
            timesteps=meta["timesteps"],
            time_scale=meta["time_scale"],
            reverse_time=meta.get("reverse_time", False),
        )


def ddpm_betas(schedule: str, num_steps: int = DDPM_STEPS) -> torch.Tensor:
    """Float64 betas: "linear" (Ho et al. 2020) or "cosine" (Nichol & Dhariwal 2021, eq. 17)."""
    if schedule == "linear":
        # Ho et al. fix 1e-4..0.02 for T=1000; scaled by 1000/T for other T (Nichol & Dhariwal).
        lo, hi = (b * DDPM_STEPS / num_steps for b in LINEAR_BETAS)
        return torch.linspace(lo, hi, num_steps, dtype=torch.float64)
    if schedule == "cosine":
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        abar = torch.cos((steps + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=COSINE_MAX_BETA)
    raise ObjectiveError(f"DDPM schedule {schedule!r} is not one of {DDPM.SCHEDULES}")


@dataclass(frozen=True, kw_only=True)
class DDPM(_MSEObjective):
    """Discrete-time DDPM with epsilon prediction (see the module docstring)."""

    KIND: ClassVar[str] = "ddpm"
    SCHEDULES: ClassVar[tuple[str, ...]] = ("linear", "cosine")

    schedule: str = "linear"
    """Beta schedule: "linear" (1e-4..0.02) or "cosine" (s=0.008, betas clipped at 0.999)."""
    num_steps: int = DDPM_STEPS
    """Number of diffusion steps T; steps are 0..T-1."""
    learn_sigma: bool = False
    """Learn the variance too: 2C model outputs and DiT's hybrid loss L_simple + L_vlb."""

    def __post_init__(self) -> None:
        if self.schedule not in self.SCHEDULES:
            raise ObjectiveError(f"DDPM schedule {self.schedule!r} is not one of {self.SCHEDULES}")
        if self.num_steps < 1:
            raise ObjectiveError(f"DDPM num_steps must be >= 1, got {self.num_steps}")

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t = prod_{s<=t} (1 - beta_s), float64 (T,)."""
        return torch.cumprod(1 - ddpm_betas(self.schedule, self.num_steps), dim=0)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The model's time input: the DDPM step itself."""
        return t

    def loss_of(self, out, *, x0, x_t, t, target) -> Loss:
        """The MSE on eps; with learn_sigma plus L_vlb on the variance half (`trainer.vlb`)."""
        if not self.learn_sigma:
            return super().loss_of(out, x0=x0, x_t=x_t, t=t, target=target)
        betas = ddpm_betas(self.schedule, self.num_steps)
        mse, vb = hybrid_terms(
            out, x0=x0.float(), x_t=x_t.float(), t=t.long(), eps=target.float(), betas=betas
        )
        return Loss((mse + vb).mean(), {"mse": mse.detach().mean(), "vlb": vb.detach().mean()})

    def corrupt(
        self,
        x0: torch.Tensor,
        generator: torch.Generator,
        *,
        offset: int = 0,
        total: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, model time = integer step as float, target noise eps) for clean latents x0."""

        def steps(s):
            return torch.randint(0, self.num_steps, s, generator=generator, device=x0.device)

        t = _draw((x0.shape[0],), total, offset, steps)
        eps = _noise_like(x0, generator, offset, total)
        abar = _alphas_cumprod_on(self.schedule, self.num_steps, x0.device)[t]
        abar = abar.view(-1, *[1] * (x0.ndim - 1))
        x_t = abar.sqrt().to(x0.dtype) * x0 + (1 - abar).sqrt().to(x0.dtype) * eps
        return x_t, t.to(x0.dtype), eps

    def to_meta(self) -> dict[str, Any]:
        return {"kind": self.KIND, "prediction": "epsilon", **asdict(self)}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> DDPM:
        return cls(
            schedule=meta["schedule"],
            num_steps=meta["num_steps"],
            learn_sigma=meta.get("learn_sigma", False),
        )


@functools.lru_cache(maxsize=8)
def _alphas_cumprod_on(schedule: str, num_steps: int, device: torch.device) -> torch.Tensor:
    """DDPM(...).alphas_cumprod on `device`, made once (a copy at every step would make the host
    wait for the GPU)."""
    return DDPM(schedule=schedule, num_steps=num_steps).alphas_cumprod.to(device)


Objective = FlowMatching | DDPM
OBJECTIVES: dict[str, type[FlowMatching] | type[DDPM]] = {
    FlowMatching.KIND: FlowMatching,
    DDPM.KIND: DDPM,
}


def objective_from_meta(meta: dict[str, Any]) -> Objective:
    """Rebuild the objective recorded in a checkpoint's meta.json ("objective")."""
    kind = meta.get("kind")
    if kind not in OBJECTIVES:
        raise ObjectiveError(f"objective kind {kind!r} is not one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[kind].from_meta(meta)
