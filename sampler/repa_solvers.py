"""REPA's samplers, rule for rule (sihyun-yu/REPA `samplers.py`, Yu et al. 2025).

    x0 = sample_repa_ode(model_fn, noise, steps=50, heun=True)   # its euler_sampler, --heun
    x0 = sample_repa_sde(model_fn, noise, steps=250)             # its euler_maruyama_sampler

Time as in REPA and the flow solvers: t in [0, 1], t = 1 noise, and the model returns the
velocity v = d_alpha x0 + d_sigma eps = eps - x0 of the linear path x_t = (1 - t) x0 + t eps.
Where these differ from `sample_heun` and `sample_euler_maruyama`, they do what REPA does:
- the state is kept in float64; the model is called in the starting latents' dtype and its
  output cast back to float64; the result is returned in the latents' dtype (generate.py casts
  REPA's float64 result to float32);
- guidance is decided once per step, at the step's start t_i, on the float64 grid (REPA:
  `guidance_low <= t_cur <= guidance_high`), and Heun's corrector at t_{i+1} follows that
  decision: `model_fn` is called as `model_fn(x, t, guide_at=t_i)`, which a `guided` function
  takes (a plain model function must accept and may ignore `guide_at`);
- Heun corrects every step but the last, which is plain Euler (no model call at t = 0).
The SDE has REPA's fixed settings: diffusion w(t) = 2t (`compute_diffusion`), the grid
linspace(1, 0.04, N) then 0, noise drawn at each step before the model call as standard normals
shaped and typed like the float64 state (`noise(x)`; REPA: `torch.randn_like(x_cur)`), and a last
step to t = 0 that takes the mean only. REPA applies guidance to the drift v - w/2 s; the drift is
affine in v with the same x and t in both halves of the batch, so guiding v and then forming the
drift is the same (to float64 rounding), which is what is done here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import trange

from sampler.solver_base import ModelFn, NoiseFn, batch_time, flow_times, report

REPA_LAST_STEP = 0.04  # samplers.py: linspace(1., 0.04, num_steps), then a last step to 0


def score_from_velocity(v: Tensor, x: Tensor, t: float) -> Tensor:
    """The score of x_t from the velocity on the linear path (REPA's `get_score_from_velocity`).

    alpha_t = 1 - t, sigma_t = t: s = (alpha_t / d_alpha_t v - x) / (sigma_t^2 - alpha_t /
    d_alpha_t d_sigma_t sigma_t), with d_alpha_t = -1, d_sigma_t = 1; t > 0.
    """
    reverse_alpha_ratio = (1 - t) / -1.0
    var = t**2 - reverse_alpha_ratio * t
    return (reverse_alpha_ratio * v - x) / var


def _velocity(
    model_fn: ModelFn, x: Tensor, t: float, dtype: torch.dtype, guide_at: float
) -> Tensor:
    """The model's velocity at float64 state x and time t, called in `dtype`, as float64."""
    x_in = x.to(dtype)
    return model_fn(x_in, batch_time(x_in, t), guide_at=guide_at).to(torch.float64)


@torch.no_grad()
def sample_repa_ode(
    model_fn: ModelFn, x: Tensor, steps: int, *, callback=None, disable=False, heun: bool = False
) -> Tensor:
    """REPA's `euler_sampler`: Euler, or with `heun` Heun, from t = 1 to 0 on linspace(1, 0, N+1).

    Model calls: `steps` (Euler) or 2 steps - 1 (Heun: the last step is not corrected).
    """
    dtype, ts = x.dtype, flow_times(steps).tolist()
    x = x.to(torch.float64)
    for i in trange(steps, disable=disable, leave=False):
        t, t_next = ts[i], ts[i + 1]
        d = _velocity(model_fn, x, t, dtype, guide_at=t)
        x_next = x + (t_next - t) * d
        if heun and i < steps - 1:
            d_prime = _velocity(model_fn, x_next, t_next, dtype, guide_at=t)
            x_next = x + (t_next - t) * (0.5 * d + 0.5 * d_prime)
        x = x_next
        report(callback, i, t, x, d)
    return x.to(dtype)


@torch.no_grad()
def sample_repa_sde(
    model_fn: ModelFn,
    x: Tensor,
    steps: int,
    *,
    callback=None,
    disable=False,
    noise: NoiseFn | None = None,
) -> Tensor:
    """REPA's `euler_maruyama_sampler`: Euler–Maruyama on dx = [v - w/2 s] dt + sqrt(w) dW, w = 2t.

    `steps` model calls: steps - 1 stochastic steps on linspace(1, 0.04, steps), then the mean of
    the step from 0.04 to 0. `noise(x)` gives standard normals like the float64 state x.
    """
    noise = noise or torch.randn_like
    dtype, ts = x.dtype, flow_times(steps, last_step=REPA_LAST_STEP).tolist()
    x = x.to(torch.float64)
    for i in trange(steps, disable=disable, leave=False):
        t, dt = ts[i], ts[i + 1] - ts[i]
        last = i == steps - 1
        eps = None if last else noise(x)  # drawn before the model call, as REPA's randn_like
        v = _velocity(model_fn, x, t, dtype, guide_at=t)
        diffusion = 2 * t  # REPA's compute_diffusion
        drift = v - 0.5 * diffusion * score_from_velocity(v, x, t)
        x = x + drift * dt
        if not last:
            x = x + math.sqrt(diffusion) * (eps * math.sqrt(abs(dt)))
        report(callback, i, t, x, v)
    return x.to(dtype)
