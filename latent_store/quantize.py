"""Per-channel affine uint8 quantization of latents: the one codec every reader shares.

    q = clamp(round((x - offset_c) / scale_c), 0, 255)      x̂ = offset_c + scale_c * q

`offset_c` and `scale_c` are calibrated once from the first latents (robust percentiles) and
stored in the store's metadata. For values inside the calibrated range, |x - x̂| <= scale_c / 2.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from latent_store.quant_params import CHANNEL_DIM, QMAX, SCHEME, QuantParams

__all__ = [
    "CHANNEL_DIM",
    "QMAX",
    "SCHEME",
    "QuantParams",
    "calibrate",
    "dequantize",
    "quantize",
    "quantize_codes",
]


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


@functools.lru_cache(maxsize=64)
def _per_channel_on(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor, even when first asked for in inference
        return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).to(device)


def _per_channel(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against (..., C, H, W), on `like`'s device.

    Made once per device and reused (read-only): building it anew from a Python tuple is a
    blocking host-to-device copy that would make the host wait for the GPU at every batch.
    """
    return _per_channel_on(tuple(values), like.device)


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


def quantize_codes(
    x: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The arithmetic of `quantize` on tensors, without waiting for the device.

    x float (B, ..., C, H, W); offset and scale float32 (C, 1, 1). Returns the uint8 codes and the
    number of clipped values of each sample, an int64 (B,) tensor on x's device. Traceable by
    torch.compile (no host synchronization), so the encode graph fuses it with the encoder.
    """
    codes = torch.round((x.float() - offset) / scale)
    clipped = ((codes < 0) | (codes > QMAX)).flatten(1).sum(1)
    return codes.clamp_(0, QMAX).to(torch.uint8), clipped


def quantize(x: torch.Tensor, params: QuantParams) -> tuple[torch.Tensor, int]:
    """Quantize float latents (..., C, H, W) to uint8 on their device.

    Returns the codes and the number of values that fell outside the range and were clipped.
    """
    x = _as_tensor(x).float()
    codes, clipped = quantize_codes(
        x.reshape(1, *x.shape), _per_channel(params.offset, x), _per_channel(params.scale, x)
    )
    return codes[0], int(clipped.sum())


def dequantize(
    q: np.ndarray | torch.Tensor, params: QuantParams, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Invert `quantize`: uint8 codes (..., C, H, W) to latents, computed on the codes' device."""
    q = _as_tensor(q)
    x = q.float() * _per_channel(params.scale, q) + _per_channel(params.offset, q)
    return x.to(dtype)
