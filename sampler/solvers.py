"""Solvers: pure functions from initial noise to a sample, one shared signature.

    x0 = sample_heun(model_fn, noise, steps=50)

Every solver is `(model_fn, x, steps, *, callback=None, disable=False, ...)`, k-diffusion style,
with an explicit step count. `model_fn(x, t)` takes x (B, ...) and t (B,) float in the solver's
time and returns a tensor shaped like x:
- flow solvers: t in [0, 1] on the path x_t = (1 - t) x0 + t eps (t = 1 is noise) and the model
  returns the velocity v = eps - x0;
- noise-prediction solvers: t is the DDPM timestep 0..T-1 (as float) and the model returns eps;
  they take the training schedule's `alphas_cumprod` (T,) as an argument.
Stochastic solvers draw noise through `noise(x)` (default `torch.randn_like`), so a caller can
give every image its own generator. `callback` gets {"i", "t", "x", "pred"} after each step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm, trange

ModelFn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[Tensor], Tensor]
Callback = Callable[[dict], None]


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23); s > 1 spends more steps near noise."""
    return shift * t / (1 + (shift - 1) * t)


def flow_times(steps: int, shift: float = 1.0) -> Tensor:
    """steps + 1 times from 1 (noise) down to 0 (data), uniform in t before the shift; float64."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def _batch_t(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def _report(callback: Callback | None, i: int, t: float, x: Tensor, pred: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "pred": pred})


# --- flow matching (velocity prediction) ------------------------------------------------------


@torch.no_grad()
def sample_euler(
    model_fn: ModelFn, x: Tensor, steps: int, *, callback=None, disable=False, shift: float = 1.0
) -> Tensor:
    """Euler on the probability-flow ODE dx/dt = v(x, t) from t = 1 to 0; `steps` model calls."""
    ts = flow_times(steps, shift).tolist()
    for i in trange(steps, disable=disable, leave=False):
        v = model_fn(x, _batch_t(x, ts[i]))
        x = x + (ts[i + 1] - ts[i]) * v
        _report(callback, i, ts[i], x, v)
    return x


@torch.no_grad()
def sample_heun(
    model_fn: ModelFn, x: Tensor, steps: int, *, callback=None, disable=False, shift: float = 1.0
) -> Tensor:
    """Heun's second-order method (explicit trapezoid) on dx/dt = v(x, t); 2 * steps model calls.

    Unlike k-diffusion's Heun, the last step is corrected too: a velocity model is defined at t = 0.
    """
    ts = flow_times(steps, shift).tolist()
    for i in trange(steps, disable=disable, leave=False):
        dt = ts[i + 1] - ts[i]
        v = model_fn(x, _batch_t(x, ts[i]))
        x_euler = x + dt * v
        v_next = model_fn(x_euler, _batch_t(x, ts[i + 1]))
        x = x + dt * (v + v_next) / 2
        _report(callback, i, ts[i], x, v)
    return x


@torch.no_grad()
def sample_euler_maruyama(
    model_fn: ModelFn,
    x: Tensor,
    steps: int,
    *,
    callback=None,
    disable=False,
    shift: float = 1.0,
    diffusion: float = 1.0,
    noise: NoiseFn | None = None,
) -> Tensor:
    """Euler–Maruyama on the reverse-time SDE with the flow's marginals; `steps` model calls.

    The SDE (SiT, Ma et al. 2024, sec. 2.3; Albergo et al. 2023), time running from 1 to 0:
        dx = [v(x, t) - w(t)/2 s(x, t)] dt + sqrt(w(t)) dW,   w(t) = diffusion * t,
    where the score follows from the velocity on the linear path: s(x, t) = -(x + (1 - t) v) / t,
    so w(t)/2 s = -diffusion/2 (x + (1 - t) v) stays finite at t = 0. diffusion = 0 is the ODE.
    The last step takes the drift only (no noise), as SiT's "Mean" last step.
    """
    noise = noise or torch.randn_like
    ts = flow_times(steps, shift).tolist()
    for i in trange(steps, disable=disable, leave=False):
        t, h = ts[i], ts[i] - ts[i + 1]  # h > 0: step size backwards in time
        v = model_fn(x, _batch_t(x, t))
        half_w_score = -diffusion / 2 * (x + (1 - t) * v)
        x = x - h * (v - half_w_score)
        if i < steps - 1:
            x = x + math.sqrt(diffusion * t * h) * noise(x)
        _report(callback, i, t, x, v)
    return x


# --- noise prediction (DDPM-trained models) ----------------------------------------------------


def ddpm_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps from T-1 down, evenly spaced, the last one T/steps - 1.

    The "trailing" spacing of Lin et al. 2024 (Table 2): the step after the last goes to the clean
    sample, so no model call is spent at t = 0, where tiny sigma makes a huge logSNR jump.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    stride = num_train_timesteps / steps
    return [round(num_train_timesteps - i * stride) - 1 for i in range(steps)]


def _schedule(alphas_cumprod: Tensor, steps: int) -> list[tuple[int, float, float]]:
    """(t, abar_t, abar_next) per step; the step after the last goes to the clean sample (abar 1)."""
    abar = alphas_cumprod.double().cpu()
    ts = ddpm_timesteps(len(abar), steps)
    nexts = [float(abar[s]) for s in ts[1:]] + [1.0]
    return [(t, float(abar[t]), a_next) for t, a_next in zip(ts, nexts, strict=True)]


def _steps(alphas_cumprod: Tensor, steps: int, disable: bool):
    """Enumerate the schedule behind a progress bar."""
    return enumerate(tqdm(_schedule(alphas_cumprod, steps), disable=disable, leave=False))


def _predict_x0(x: Tensor, eps: Tensor, abar: float) -> Tensor:
    return (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)


@torch.no_grad()
def sample_ddpm(
    model_fn: ModelFn,
    x: Tensor,
    steps: int,
    *,
    alphas_cumprod: Tensor,
    callback=None,
    disable=False,
    noise: NoiseFn | None = None,
) -> Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, eqs. 6-7).

    Over respaced timesteps (Nichol & Dhariwal 2021, sec. 4) with the posterior variance
    (1 - abar_s)/(1 - abar_t) (1 - abar_t/abar_s) ("fixed small"); mathematically DDIM with eta = 1.
    """
    noise = noise or torch.randn_like
    for i, (t, a, a_next) in _steps(alphas_cumprod, steps, disable):
        eps = model_fn(x, _batch_t(x, t))
        x0 = _predict_x0(x, eps, a)
        alpha_step = a / a_next  # alpha of the respaced step t -> s
        mean = (
            math.sqrt(a_next) * (1 - alpha_step) * x0 + math.sqrt(alpha_step) * (1 - a_next) * x
        ) / (1 - a)
        var = (1 - a_next) / (1 - a) * (1 - alpha_step)
        x = mean + math.sqrt(var) * noise(x) if var > 0 else mean
        _report(callback, i, t, x, x0)
    return x


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    x: Tensor,
    steps: int,
    *,
    alphas_cumprod: Tensor,
    eta: float = 0.0,
    callback=None,
    disable=False,
    noise: NoiseFn | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): eta = 0 is deterministic, eta = 1 matches DDPM ancestral."""
    noise = noise or torch.randn_like
    for i, (t, a, a_next) in _steps(alphas_cumprod, steps, disable):
        eps = model_fn(x, _batch_t(x, t))
        x0 = _predict_x0(x, eps, a)
        sigma = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        x = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise(x)
        _report(callback, i, t, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model_fn: ModelFn,
    x: Tensor,
    steps: int,
    *,
    alphas_cumprod: Tensor,
    callback=None,
    disable=False,
) -> Tensor:
    """DPM-Solver++(2M), multistep second order in data prediction (Lu et al. 2022, Algorithm 2).

    lambda_t = log(alpha_t / sigma_t) with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t). The
    first step is first order; the last step (to sigma = 0, lambda = inf) returns x0_hat.
    """

    def lam(a: float) -> float:
        return 0.5 * math.log(a / (1 - a))

    x0_prev, h_prev = None, None
    for i, (t, a, a_next) in _steps(alphas_cumprod, steps, disable):
        eps = model_fn(x, _batch_t(x, t))
        x0 = _predict_x0(x, eps, a)
        if a_next >= 1.0:
            x = x0
        else:
            h = lam(a_next) - lam(a)
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            sigma_ratio = math.sqrt((1 - a_next) / (1 - a))
            x = sigma_ratio * x - math.sqrt(a_next) * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        _report(callback, i, t, x, x0)
    return x


# --- registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Solver:
    """A registered solver: its function, the objective kind it serves, how it is called."""

    fn: Callable[..., Tensor]
    kind: str  # the objective kind: "flow_matching" (velocity) or "ddpm" (noise prediction)
    takes_noise: bool  # draws fresh noise during sampling (accepts `noise=`)
    calls_per_step: int = 1


SOLVERS: dict[str, Solver] = {
    "euler": Solver(sample_euler, "flow_matching", False),
    "heun": Solver(sample_heun, "flow_matching", False, calls_per_step=2),
    "euler-maruyama": Solver(sample_euler_maruyama, "flow_matching", True),
    "ddpm": Solver(sample_ddpm, "ddpm", True),
    "ddim": Solver(sample_ddim, "ddpm", True),
    "dpm++2m": Solver(sample_dpmpp_2m, "ddpm", False),
}
DEFAULT_SOLVER = {"flow_matching": "heun", "ddpm": "dpm++2m"}


def solvers_for(kind: str) -> list[str]:
    """Names of the solvers that serve an objective kind."""
    return [name for name, s in SOLVERS.items() if s.kind == kind]
