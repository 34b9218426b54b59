"""Per-channel affine uint8 quantization of latents: the one codec every reader shares.

    q = clamp(round((x - offset_c) / scale_c), 0, 255)      x̂ = offset_c + scale_c * q

`offset_c` and `scale_c` are calibrated once from the first latents (robust percentiles) and
stored in the store's metadata. For values inside the calibrated range, |x - x̂| <= scale_c / 2.
"""

from __future__ import annotations

import numpy as np
import torch

from latent_store.quant_params import CHANNEL_DIM, QMAX, SCHEME, QuantParams

__all__ = ["CHANNEL_DIM", "QMAX", "SCHEME", "QuantParams", "calibrate", "dequantize", "quantize"]


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


def _per_channel(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """Shape a per-channel vector to broadcast against (..., C, H, W)."""
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(-1, 1, 1)


def calibrate(
    x: np.ndarray | torch.Tensor,
    *,
    lower_percentile: float = 0.01,
    upper_percentile: float = 99.99,
    margin: float = 0.05,
) -> QuantParams:
    """Choose per-channel offset/scale from sample latents (..., C, H, W).

    The range spans the given percentiles of each channel, widened by `margin` of its width on
    both sides so that later batches rarely clip. Parameters are rounded to float32 so that
    dequantization is bit-reproducible in float32 on any device.
    """
    t = _as_tensor(x).detach().float().cpu()
    per_channel = t.movedim(CHANNEL_DIM, 0).reshape(t.shape[CHANNEL_DIM], -1).numpy()
    lo = np.percentile(per_channel, lower_percentile, axis=1)
    hi = np.percentile(per_channel, upper_percentile, axis=1)
    width = np.maximum(hi - lo, 1e-6)
    lo, hi = lo - margin * width, hi + margin * width
    scale = ((hi - lo) / QMAX).astype(np.float32)
    offset = lo.astype(np.float32)
    return QuantParams(offset=tuple(map(float, offset)), scale=tuple(map(float, scale)))


def quantize(x: torch.Tensor, params: QuantParams) -> tuple[torch.Tensor, int]:
    """Quantize float latents (..., C, H, W) to uint8 on their device.

    Returns the codes and the number of values that fell outside the range and were clipped.
    """
    x = _as_tensor(x).float()
    codes = torch.round((x - _per_channel(params.offset, x)) / _per_channel(params.scale, x))
    clipped = int(((codes < 0) | (codes > QMAX)).sum())
    return codes.clamp_(0, QMAX).to(torch.uint8), clipped


def dequantize(
    q: np.ndarray | torch.Tensor, params: QuantParams, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Invert `quantize`: uint8 codes (..., C, H, W) to latents, computed on the codes' device."""
    q = _as_tensor(q)
    x = q.float() * _per_channel(params.scale, q) + _per_channel(params.offset, q)
    return x.to(dtype)
