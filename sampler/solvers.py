"""Solvers: pure functions from initial noise to a sample, one shared signature.

    x0 = sample_heun(model_fn, noise, steps=50)

Every solver is `(model_fn, x, steps, *, callback=None, disable=False, ...)`, k-diffusion style,
with an explicit step count. `model_fn(x, t)` takes x (B, ...) and t (B,) float in the solver's
time and returns a tensor shaped like x:
- flow solvers: t in [0, 1] on the path x_t = (1 - t) x0 + t eps (t = 1 is noise) and the model
  returns the velocity v = eps - x0;
- noise-prediction solvers: t is the DDPM timestep 0..T-1 (as float) and the model returns eps;
  they take the training schedule's `alphas_cumprod` (T,) as an argument, and `spacing`: which
  timesteps the steps visit ("trailing", ours, or "official", DiT/ADM's `space_timesteps`).
  `sample_ddpm(variance="learned")` takes a model of 2C output channels: eps, then the variance
  values v in [-1, 1] (Nichol & Dhariwal 2021, eq. 15).
Stochastic solvers draw noise through `noise(x)` (default `torch.randn_like`), so a caller can
give every image its own generator. `callback` gets {"i", "t", "x", "pred"} after each step.
REPA's own samplers (`sampler.repa_solvers`) are registered beside ours as repa-euler, repa-heun
and repa-euler-maruyama. Each registry entry names the `SolveConfig` options its solver takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor
from tqdm.auto import tqdm, trange

from sampler.config import SPACINGS, VARIANCES
from sampler.repa_solvers import sample_repa_ode, sample_repa_sde
from sampler.solver_base import ModelFn, NoiseFn, batch_time, flow_times, report

# --- flow matching (velocity prediction) ------------------------------------------------------


@torch.no_grad()
def sample_euler(
    model_fn: ModelFn, x: Tensor, steps: int, *, callback=None, disable=False, shift: float = 1.0
) -> Tensor:
    """Euler on the probability-flow ODE dx/dt = v(x, t) from t = 1 to 0; `steps` model calls."""
    ts = flow_times(steps, shift).tolist()
    for i in trange(steps, disable=disable, leave=False):
        v = model_fn(x, batch_time(x, ts[i]))
        x = x + (ts[i + 1] - ts[i]) * v
        report(callback, i, ts[i], x, v)
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
        v = model_fn(x, batch_time(x, ts[i]))
        x_euler = x + dt * v
        v_next = model_fn(x_euler, batch_time(x, ts[i + 1]))
        x = x + dt * (v + v_next) / 2
        report(callback, i, ts[i], x, v)
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
    last_step: float | None = None,
    noise: NoiseFn | None = None,
) -> Tensor:
    """Euler–Maruyama on the reverse-time SDE with the flow's marginals; `steps` model calls.

    The SDE (SiT, Ma et al. 2024, sec. 2.3; Albergo et al. 2023), time running from 1 to 0:
        dx = [v(x, t) - w(t)/2 s(x, t)] dt + sqrt(w(t)) dW,   w(t) = diffusion * t,
    where the score follows from the velocity on the linear path: s(x, t) = -(x + (1 - t) v) / t,
    so w(t)/2 s = -diffusion/2 (x + (1 - t) v) stays finite at t = 0. diffusion = 0 is the ODE.
    The last step takes the drift only (no noise), as SiT's "Mean" last step. SiT's SDE with
    `--diffusion-form sigma --diffusion-norm n` (its w = n sigma_t, noise sqrt(2 w dt)) is
    diffusion = 2 n here; its `--last-step-size` is `last_step` (see `flow_times`).
    """
    noise = noise or torch.randn_like
    ts = flow_times(steps, shift, last_step).tolist()
    for i in trange(steps, disable=disable, leave=False):
        t, h = ts[i], ts[i] - ts[i + 1]  # h > 0: step size backwards in time
        v = model_fn(x, batch_time(x, t))
        half_w_score = -diffusion / 2 * (x + (1 - t) * v)
        x = x - h * (v - half_w_score)
        if i < steps - 1:
            x = x + math.sqrt(diffusion * t * h) * noise(x)
        report(callback, i, t, x, v)
    return x


# --- noise prediction (DDPM-trained models) ----------------------------------------------------


def ddpm_timesteps(
    num_train_timesteps: int, steps: int, spacing: str = "trailing", *, ddim: bool = False
) -> list[int]:
    """`steps` timesteps from high to low.

    "trailing" (Lin et al. 2024, Table 2): evenly spaced from T-1 down, the last one T/steps - 1;
    the step after the last goes to the clean sample, so no model call is spent at t = 0.
    "official": DiT's (and ADM's) `space_timesteps(T, "N")`: round(i (T-1)/(N-1)), from 0 to
    T-1, so t = 0 is visited; with `ddim`, its "ddimN": the integer stride k with
    len(range(0, T, k)) = N (the DDIM paper's striding).
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing {spacing!r} is not one of {SPACINGS}")
    if spacing == "trailing":
        stride = num_train_timesteps / steps
        return [round(num_train_timesteps - i * stride) - 1 for i in range(steps)]
    if ddim:
        for k in range(1, num_train_timesteps):
            if len(range(0, num_train_timesteps, k)) == steps:
                return list(range(0, num_train_timesteps, k))[::-1]
        raise ValueError(f"no integer stride makes {steps} DDIM steps of {num_train_timesteps}")
    stride = (num_train_timesteps - 1) / (steps - 1) if steps > 1 else 1
    return sorted({round(i * stride) for i in range(steps)}, reverse=True)


def _schedule(
    alphas_cumprod: Tensor, steps: int, spacing: str = "trailing", ddim: bool = False
) -> list[tuple[int, float, float]]:
    """(t, abar_t, abar_next) per step; the step after the last goes to the clean sample (abar 1)."""
    abar = alphas_cumprod.double().cpu()
    ts = ddpm_timesteps(len(abar), steps, spacing, ddim=ddim)
    nexts = [float(abar[s]) for s in ts[1:]] + [1.0]
    return [(t, float(abar[t]), a_next) for t, a_next in zip(ts, nexts, strict=True)]


def _steps(alphas_cumprod: Tensor, steps: int, disable: bool, spacing: str, ddim: bool = False):
    """Enumerate the schedule behind a progress bar."""
    schedule = _schedule(alphas_cumprod, steps, spacing, ddim)
    return enumerate(tqdm(schedule, disable=disable, leave=False))


def _predict_x0(x: Tensor, eps: Tensor, abar: float) -> Tensor:
    return (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)


def ddpm_step(
    x: Tensor,
    eps: Tensor,
    *,
    a: float,
    a_next: float,
    variance: str = "fixed-small",
    var_values: Tensor | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One ancestral step t -> s from the posterior q(x_s | x_t, x0_hat); returns (x_s, x0_hat).

    a, a_next: abar_t and abar_s (1 for the step to the clean sample, which adds no noise).
    The respaced step's beta = 1 - abar_t/abar_s; its variance (Nichol & Dhariwal 2021, sec. 3.1):
    "fixed-small" the posterior variance (1 - abar_s)/(1 - abar_t) beta, "fixed-large" beta,
    "learned" exp(f log beta + (1 - f) log posterior) with f = (v + 1)/2 from var_values v.
    """
    x0 = _predict_x0(x, eps, a)
    alpha_step = a / a_next  # of the respaced step t -> s
    beta = 1 - alpha_step
    mean = (math.sqrt(a_next) * beta * x0 + math.sqrt(alpha_step) * (1 - a_next) * x) / (1 - a)
    if noise is None or a_next >= 1.0:
        return mean, x0
    posterior = (1 - a_next) / (1 - a) * beta
    if variance == "learned":
        frac = (var_values + 1) / 2
        log_var = frac * math.log(beta) + (1 - frac) * math.log(posterior)
        return mean + torch.exp(0.5 * log_var) * noise, x0
    return mean + math.sqrt(posterior if variance == "fixed-small" else beta) * noise, x0


@torch.no_grad()
def sample_ddpm(
    model_fn: ModelFn,
    x: Tensor,
    steps: int,
    *,
    alphas_cumprod: Tensor,
    variance: str = "fixed-small",
    spacing: str = "trailing",
    callback=None,
    disable=False,
    noise: NoiseFn | None = None,
) -> Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, eqs. 6-7).

    Over respaced timesteps (Nichol & Dhariwal 2021, sec. 4), each step a `ddpm_step` of the
    given variance; "fixed-small" is mathematically DDIM with eta = 1. With variance "learned",
    model_fn returns (B, 2C, ...): eps, then the variance values (DiT's learn_sigma models).
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance {variance!r} is not one of {VARIANCES}")
    noise = noise or torch.randn_like
    for i, (t, a, a_next) in _steps(alphas_cumprod, steps, disable, spacing):
        eps, var_values = model_fn(x, batch_time(x, t)), None
        if variance == "learned":
            eps, var_values = eps.chunk(2, dim=1)
        step_noise = noise(x) if a_next < 1.0 else None
        x, x0 = ddpm_step(
            x, eps, a=a, a_next=a_next, variance=variance, var_values=var_values, noise=step_noise
        )
        report(callback, i, t, x, x0)
    return x


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    x: Tensor,
    steps: int,
    *,
    alphas_cumprod: Tensor,
    eta: float = 0.0,
    spacing: str = "trailing",
    callback=None,
    disable=False,
    noise: NoiseFn | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): eta = 0 is deterministic, eta = 1 matches DDPM ancestral.

    spacing "official" is DiT's "ddimN" striding (t = 0, k, 2k, ...).
    """
    noise = noise or torch.randn_like
    for i, (t, a, a_next) in _steps(alphas_cumprod, steps, disable, spacing, ddim=True):
        eps = model_fn(x, batch_time(x, t))
        x0 = _predict_x0(x, eps, a)
        sigma = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        x = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise(x)
        report(callback, i, t, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model_fn: ModelFn,
    x: Tensor,
    steps: int,
    *,
    alphas_cumprod: Tensor,
    spacing: str = "trailing",
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
    for i, (t, a, a_next) in _steps(alphas_cumprod, steps, disable, spacing):
        eps = model_fn(x, batch_time(x, t))
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
        report(callback, i, t, x, x0)
    return x


# --- registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Solver:
    """A registered solver: its function, the objective kind it serves, how it is called."""

    fn: Callable[..., Tensor]
    kind: str  # the objective kind: "flow_matching" (velocity) or "ddpm" (noise prediction)
    takes_noise: bool  # draws fresh noise during sampling (accepts `noise=`)
    calls_per_step: int = 1
    options: tuple[str, ...] = ()
    """The `SolveConfig` fields passed to `fn` as keywords of the same name."""


SOLVERS: dict[str, Solver] = {
    "euler": Solver(sample_euler, "flow_matching", False, options=("shift",)),
    "heun": Solver(sample_heun, "flow_matching", False, calls_per_step=2, options=("shift",)),
    "euler-maruyama": Solver(
        sample_euler_maruyama, "flow_matching", True, options=("shift", "diffusion", "last_step")
    ),
    "repa-euler": Solver(sample_repa_ode, "flow_matching", False),
    "repa-heun": Solver(
        partial(sample_repa_ode, heun=True), "flow_matching", False, calls_per_step=2
    ),
    "repa-euler-maruyama": Solver(sample_repa_sde, "flow_matching", True),
    "ddpm": Solver(sample_ddpm, "ddpm", True, options=("spacing", "variance")),
    "ddim": Solver(sample_ddim, "ddpm", True, options=("spacing", "eta")),
    "dpm++2m": Solver(sample_dpmpp_2m, "ddpm", False, options=("spacing",)),
}
DEFAULT_SOLVER = {"flow_matching": "heun", "ddpm": "dpm++2m"}


def solvers_for(kind: str) -> list[str]:
    """Names of the solvers that serve an objective kind."""
    return [name for name, s in SOLVERS.items() if s.kind == kind]


def solvers_taking(option: str) -> list[str]:
    """Names of the solvers that take a `SolveConfig` option."""
    return [name for name, s in SOLVERS.items() if option in s.options]
