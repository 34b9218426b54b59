"""The variational bound term of the hybrid loss for a learned variance (Nichol & Dhariwal 2021).

    mse, vb = hybrid_terms(out, x0=x0, x_t=x_t, t=t, eps=eps, betas=betas)   # each (B,)
    loss = (mse + vb).mean()

What DiT trains with (its `diffusion.training_losses` with learn_sigma, from ADM/IDDPM):
L_hybrid = L_simple + L_vlb (eq. 16, lambda = 1 with the 1000-step process), where the model
outputs eps and variance values v in [-1, 1], log sigma^2 = f log beta_t + (1 - f) log beta~_t with
f = (v + 1)/2 (eq. 15), and L_vlb sees the mean through a stop-gradient, so only the variance
learns from it (sec. 3.1). L_vlb is in bits per dimension: KL(q(x_{t-1}|x_t, x0) || p) for t > 0
and the discretized Gaussian decoder NLL at t = 0 (Ho et al. 2020, sec. 3.3; bins of 2/255 on
[-1, 1], kept for equality with the reference even on latents).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BIN = 1.0 / 255.0  # half-width of a decoder bin on [-1, 1]
EDGE = 0.999  # beyond it the first and last bins extend to infinity
LOG_FLOOR = 1e-12


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )  # fmt: skip


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF (as in the reference code)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of a Gaussian integrated over x's bin of width 2/255 on [-1, 1], elementwise, nats."""
    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + BIN))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=LOG_FLOOR))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=LOG_FLOOR))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=LOG_FLOOR))
    return torch.where(
        x < -EDGE, log_cdf_plus, torch.where(x > EDGE, log_one_minus_cdf_min, log_delta)
    )


def _take(values: torch.Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] (float64 table) as a (B, 1, ...) tensor of like's dtype and device."""
    out = values.to(like.device)[t].to(like.dtype)
    return out.view(-1, *[1] * (like.ndim - 1))


def hybrid_terms(
    out: Tensor, *, x0: Tensor, x_t: Tensor, t: Tensor, eps: Tensor, betas: Tensor
) -> tuple[Tensor, Tensor]:
    """(mse, vb), each (B,): L_simple per sample and L_vlb per sample (bits per dimension).

    out (B, 2C, ...) is the model output at x_t (eps prediction, variance values); t (B,) long
    steps of the full process with float64 `betas` (T,); eps the noise that made x_t from x0.
    """
    eps_pred, var_values = out.chunk(2, dim=1)
    betas = betas.double()
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    posterior = betas * (1 - abar_prev) / (1 - abar)
    log_posterior = torch.log(torch.cat([posterior[1:2], posterior[1:]]))  # t = 0 clipped to t = 1
    coef_x0 = betas * abar_prev.sqrt() / (1 - abar)
    coef_xt = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)

    def mean(start: Tensor) -> Tensor:
        return _take(coef_x0, t, x_t) * start + _take(coef_xt, t, x_t) * x_t

    x0_pred = _take(abar.rsqrt(), t, x_t) * x_t - _take((1 / abar - 1).sqrt(), t, x_t) * (
        eps_pred.detach()  # the stop-gradient: L_vlb trains the variance only
    )
    frac = (var_values + 1) / 2
    log_var = frac * _take(betas.log(), t, x_t) + (1 - frac) * _take(log_posterior, t, x_t)
    model_mean = mean(x0_pred)
    kl = normal_kl(mean(x0), _take(log_posterior, t, x_t), model_mean, log_var)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_var)
    vb = torch.where(t == 0, _mean_flat(nll), _mean_flat(kl)) / math.log(2.0)
    return _mean_flat((eps - eps_pred) ** 2), vb
