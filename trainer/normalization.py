"""Latent normalization: z = (x - mean) / std per channel, recorded in every checkpoint.

x is the raw VAE latent as stored (dequantized; what `vae.decode` takes after the sampler inverts
this), z is what the DiT sees. Two kinds:
- "channel_stats": mean and std per channel from the store summary (`channel_mean`, `channel_std`).
- "vae_scaling":   mean = the VAE's shift_factor (or 0), std = 1 / scaling_factor, the
                   diffusers convention z = (x - shift) * scaling (with the per-channel
                   latents_mean / latents_std a config may carry: `VaeInfo.channel_affine`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from latent_store import LatentditError, LatentStore


class NormalizationError(LatentditError):
    """The store lacks what a normalization kind needs, or a kind is unknown."""


@dataclass(frozen=True, kw_only=True)
class LatentNormalization:
    """Per-channel affine map between raw latents x and model inputs z."""

    KINDS: ClassVar[tuple[str, ...]] = ("channel_stats", "vae_scaling")

    kind: str
    """"channel_stats" or "vae_scaling" (see the module docstring)."""
    mean: tuple[float, ...]
    """Per-channel value subtracted from raw latents."""
    std: tuple[float, ...]
    """Per-channel positive divisor applied after subtracting `mean`."""

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise NormalizationError(f"normalization {self.kind!r} is not one of {self.KINDS}")
        if len(self.mean) != len(self.std):
            raise NormalizationError("normalization mean and std need one value per channel")
        values = (*self.mean, *self.std)
        if not all(math.isfinite(v) for v in values) or min(self.std) <= 0:
            raise NormalizationError(
                f"normalization {self.kind} has non-finite values or a std <= 0 "
                f"(mean {list(self.mean)}, std {list(self.std)})"
            )

    def _vectors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _channel_vector(self.mean, like.dtype, like.device), _channel_vector(
            self.std, like.dtype, like.device
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw latents (..., C, H, W) -> model space."""
        mean, std = self._vectors(x)
        return (x - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Model space (..., C, H, W) -> raw latents (the inverse of `normalize`)."""
        mean, std = self._vectors(z)
        return z * std + mean

    def to_meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> LatentNormalization:
        return cls(kind=meta["kind"], mean=tuple(meta["mean"]), std=tuple(meta["std"]))


@functools.lru_cache(maxsize=64)
def _channel_vector(values: tuple[float, ...], dtype: torch.dtype, device: torch.device):
    """values as a (C, 1, 1) tensor, made once per dtype and device and then reused read-only (a
    fresh host-to-device copy at every step would make the host wait for the GPU)."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype).view(-1, 1, 1).to(device)


def normalization_from_store(store: LatentStore, kind: str) -> LatentNormalization:
    """The normalization of `kind` for a store's latents."""
    channels = store.spec.latent_shape[0]
    if kind == "vae_scaling":
        mean, std = store.spec.vae.channel_affine(channels)
        return LatentNormalization(kind=kind, mean=mean, std=std)
    if kind == "channel_stats":
        summary = store.summary or {}
        if "channel_mean" not in summary:
            raise NormalizationError(
                f"{store.path}: the store has no summary with channel statistics; finish the "
                "encode run, or train with --normalization vae_scaling"
            )
        return LatentNormalization(
            kind=kind, mean=tuple(summary["channel_mean"]), std=tuple(summary["channel_std"])
        )
    raise NormalizationError(
        f"normalization {kind!r} is not one of {LatentNormalization.KINDS}: use --normalization "
        + " or ".join(LatentNormalization.KINDS)
    )
