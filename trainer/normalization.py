"""Latent normalization: z = (x - mean) / std, per channel or per position, in every checkpoint.

x is the raw latent as stored (decoded; what `vae.decode` takes after the sampler inverts this),
z is what the DiT sees. Three kinds:
- "channel_stats":  mean and std per channel from the store summary (`channel_mean`, `channel_std`).
- "vae_scaling":    mean = the VAE's shift_factor (or 0), std = 1 / scaling_factor, the
                    diffusers convention z = (x - shift) * scaling (with the per-channel
                    latents_mean / latents_std a config may carry: `VaeInfo.channel_affine`).
- "position_stats": mean and std at every position (C, H, W) from the store's statistics of its
                    latents (`latent_store.stats`), std = sqrt(var + POSITION_EPS), as RAE
                    normalizes its encoder's tokens (Zheng et al. 2025, `RAE(eps=1e-5)`).

A checkpoint's meta.json records the kind, and the values where they are small (one per channel).
Per-position values (768x16x16 for RAE) live in the checkpoint folder's NORMALIZATION_FILE
(safetensors: "mean", "std", float32 (C, H, W)), which meta.json names with their digest; a
loaded checkpoint's meta carries them in memory ("mean", "std" beside "file" and "digest").
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file

from latent_store import LatentditError, LatentStore
from latent_store.arrays import LATENTS
from latent_store.finalize import position_stats
from latent_store.stats import MEAN, VAR

NORMALIZATION_FILE = "normalization.safetensors"
POSITION_EPS = 1e-5  # RAE's eps: std = sqrt(var + eps)
CHANNEL_KINDS = ("channel_stats", "vae_scaling")
POSITION_KIND = "position_stats"


class NormalizationError(LatentditError):
    """The store lacks what a normalization kind needs, or a kind is unknown."""


@dataclass(frozen=True, kw_only=True, eq=False)
class LatentNormalization:
    """Affine map between raw latents x and model inputs z, per channel or per position."""

    KINDS: ClassVar[tuple[str, ...]] = (*CHANNEL_KINDS, POSITION_KIND)

    kind: str
    """"channel_stats", "vae_scaling" or "position_stats" (see the module docstring)."""
    mean: Any
    """Subtracted from raw latents: a tuple of floats per channel, or float32 (C, H, W)."""
    std: Any
    """Positive divisor applied after subtracting `mean`, shaped like `mean`."""
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise NormalizationError(f"normalization {self.kind!r} is not one of {self.KINDS}")
        if self.kind == POSITION_KIND:
            mean, std = (np.asarray(v, np.float32) for v in (self.mean, self.std))
            values = np.concatenate([mean.ravel(), std.ravel()]).tolist()
            if mean.ndim != 3 or mean.shape != std.shape:
                raise NormalizationError("position_stats needs mean and std of one (C, H, W) shape")
        else:
            mean, std = (tuple(float(v) for v in x) for x in (self.mean, self.std))
            values = [*mean, *std]
            if len(mean) != len(std):
                raise NormalizationError("normalization mean and std need one value per channel")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if not all(math.isfinite(v) for v in values) or min(np.ravel(std)) <= 0:
            raise NormalizationError(
                f"normalization {self.kind} has non-finite values or a std <= 0; re-encode the "
                "store, or train with another --normalization"
            )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LatentNormalization) and self.to_meta() == other.to_meta()

    __hash__ = None  # type: ignore[assignment]

    @property
    def channels(self) -> int:
        return len(self.mean)

    def _vectors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std on `like`'s dtype and device, (C, 1, 1) or (C, H, W), made once and
        reused read-only (a fresh host-to-device copy at every step would make the host wait
        for the GPU)."""
        key = (like.dtype, like.device)
        if key not in self._cache:
            with torch.inference_mode(False):
                pair = [
                    torch.as_tensor(np.asarray(v), dtype=like.dtype) for v in (self.mean, self.std)
                ]
                if self.kind != POSITION_KIND:
                    pair = [v.view(-1, 1, 1) for v in pair]
                self._cache[key] = tuple(v.to(like.device) for v in pair)
        return self._cache[key]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw latents (..., C, H, W) -> model space."""
        mean, std = self._vectors(x)
        return (x - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Model space (..., C, H, W) -> raw latents (the inverse of `normalize`)."""
        mean, std = self._vectors(z)
        return z * std + mean

    def digest(self) -> str:
        """blake2b-128 of the per-position values (shape, then mean and std, float32 bytes)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(repr(self.mean.shape).encode())
        h.update(self.mean.tobytes() + self.std.tobytes())
        return f"blake2b-128:{h.hexdigest()}"

    def to_meta(self) -> dict[str, Any]:
        """What meta.json records: the values per channel, or the file and digest per position."""
        if self.kind != POSITION_KIND:
            return {"kind": self.kind, "mean": list(self.mean), "std": list(self.std)}
        shape = list(self.mean.shape)
        return {
            "kind": self.kind,
            "shape": shape,
            "file": NORMALIZATION_FILE,
            "digest": self.digest(),
        }

    def resolved_meta(self) -> dict[str, Any]:
        """`to_meta()` with the per-position values themselves: a loaded checkpoint's form."""
        if self.kind != POSITION_KIND:
            return self.to_meta()
        return {**self.to_meta(), "mean": self.mean, "std": self.std}

    def files(self) -> dict[str, dict[str, torch.Tensor]]:
        """The files a checkpoint folder holds beside meta.json: {file name: tensors}."""
        if self.kind != POSITION_KIND:
            return {}
        return {
            NORMALIZATION_FILE: {k: torch.from_numpy(getattr(self, k)) for k in ("mean", "std")}
        }

    @classmethod
    def from_meta(
        cls, meta: dict[str, Any], folder: str | Path | None = None
    ) -> LatentNormalization:
        """The normalization a checkpoint records: its meta.json entry, with the checkpoint
        `folder` for per-position values (or a loaded meta that carries them)."""
        if meta.get("kind") != POSITION_KIND:
            return cls(kind=meta["kind"], mean=tuple(meta["mean"]), std=tuple(meta["std"]))
        if "mean" not in meta:
            if folder is None:
                raise NormalizationError(
                    f"per-position normalization is kept in the checkpoint folder's "
                    f"{meta['file']}: load the checkpoint (trainer.checkpoint.load_for_inference)"
                )
            meta = {**meta, **_read_values(Path(folder) / meta["file"])}
        norm = cls(kind=POSITION_KIND, mean=meta["mean"], std=meta["std"])
        if norm.digest() != meta["digest"]:
            where = Path(folder) / meta["file"] if folder is not None else "its values"
            raise NormalizationError(
                f"{where} does not match the digest meta.json records ({meta['digest']}); the "
                "checkpoint is damaged: use an earlier one, or retrain"
            )
        return norm


def _read_values(path: Path) -> dict[str, np.ndarray]:
    try:
        tensors = load_file(path)
        return {k: tensors[k].numpy() for k in ("mean", "std")}
    except (OSError, KeyError, ValueError) as e:
        raise NormalizationError(
            f"{path}: unreadable ({type(e).__name__}); the checkpoint is damaged or incomplete: "
            "use an earlier one, or retrain"
        ) from None


def normalization_from_store(store: LatentStore, kind: str) -> LatentNormalization:
    """The normalization of `kind` for a store's latents."""
    channels = store.spec.latent_shape[0]
    if kind == "vae_scaling":
        mean, std = store.spec.vae.channel_affine(channels)
        return LatentNormalization(kind=kind, mean=mean, std=std)
    if kind == "channel_stats":
        summary = store.summary or {}
        if summary.get("channel_mean") is None:
            raise NormalizationError(
                f"{store.path}: the store has no summary with channel statistics; finish the "
                "encode run, or train with --normalization vae_scaling"
            )
        return LatentNormalization(
            kind=kind, mean=tuple(summary["channel_mean"]), std=tuple(summary["channel_std"])
        )
    if kind == POSITION_KIND:
        try:
            row = position_stats(store, LATENTS)
        except LatentditError as e:
            raise NormalizationError(f"--normalization position_stats: {e}") from None
        std = np.sqrt(row[VAR].astype(np.float64) + POSITION_EPS).astype(np.float32)
        return LatentNormalization(kind=kind, mean=row[MEAN], std=std)
    raise NormalizationError(
        f"normalization {kind!r} is not one of {LatentNormalization.KINDS}: use --normalization "
        + " or ".join(LatentNormalization.KINDS)
    )
