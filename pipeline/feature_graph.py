"""The feature graph: uint8 crops in, the store's feature arrays out, every step on the device.

    graph = FeatureGraph(encoder, arrays=spec_arrays, projection=projection, flip=True)
    arrays, clipped = FeatureLauncher(graph).launch(crops, keys).wait()
    # arrays: {"features": (b, V, K, T), "features_cls": (b, V, K, 1)} uint8 codes or float16

Per crop and variant (the crop, and its horizontal flip when the store has one: the flip's own
tokens, not the tokens flipped), the encoder's tokens (`pipeline.features`), optionally projected
on the store's principal components, y = W (z - mu) (`Projection`), then quantized per channel
with the array's calibrated parameters (`latent_store.quantize_codes`) or cast to float16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from latent_store import ArraySpec
from latent_store.quantize import quantize_codes
from pipeline.encode_graph import Launched
from pipeline.features import FeatureEncoder
from pipeline.features_config import FEATURES, FEATURES_CLS

NAMES = (FEATURES, FEATURES_CLS)  # the graph's outputs, in the order of FeatureEncoder's


@dataclass(frozen=True)
class Projection:
    """A fitted linear projection of D-wide tokens to K dims: y = W (z - mu).

    Stored as one float32 (K + 1, D) array: row 0 is mu, rows 1..K are W (unit rows, the
    principal axes in order of decreasing variance)."""

    mean: np.ndarray  # float32 (D,)
    components: np.ndarray  # float32 (K, D)

    @property
    def dims(self) -> int:
        return self.components.shape[0]

    def to_array(self) -> np.ndarray:
        return np.concatenate([self.mean[None], self.components]).astype(np.float32)

    @classmethod
    def from_array(cls, values: np.ndarray) -> Projection:
        return cls(mean=values[0].astype(np.float32), components=values[1:].astype(np.float32))

    def apply(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., D, T) float32 -> (..., K, T)."""
        w, mu = (torch.from_numpy(v).to(tokens.device) for v in (self.components, self.mean))
        return project(tokens, w, mu)


def project(tokens: torch.Tensor, w: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """y = W (z - mu) for tokens z (..., D, T), W (K, D), mu (D,): (..., K, T)."""
    return torch.einsum("kd,...dt->...kt", w, tokens - mu[:, None])


@torch.inference_mode()
def encode_views(
    encoder: FeatureEncoder, crops: torch.Tensor, *, flip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 crops (b, H, W, 3) -> float32 patch tokens (b, V, D, T) and class tokens
    (b, V, D, 1), V = 2 with `flip` (the horizontal flip of each crop, encoded separately)."""
    b = crops.shape[0]
    crops = crops.to(encoder.device, non_blocking=True).permute(0, 3, 1, 2)
    views = torch.cat([crops, crops.flip(3)]) if flip else crops
    patch, cls = encoder(views)
    return _by_variant(patch, b), _by_variant(cls, b)


def _by_variant(x: torch.Tensor, b: int) -> torch.Tensor:
    """(V*b, ...), variant-major -> (b, V, ...)."""
    return torch.stack(x.split(b), dim=1)


class FeatureGraph(nn.Module):
    """uint8 crops to the stored feature arrays (see the module docstring)."""

    def __init__(
        self,
        encoder: FeatureEncoder,
        *,
        arrays: Sequence[ArraySpec],
        projection: Projection | None,
        flip: bool,
    ) -> None:
        super().__init__()
        self.encoder, self.projection, self.flip = encoder, projection, flip
        self.arrays = {a.name: a for a in arrays}
        assert set(self.arrays) == set(NAMES), f"feature arrays {sorted(self.arrays)}"
        # made once on the device: a copy from the host at every batch would make it wait
        device = encoder.device
        for array in arrays:
            if array.quant is not None:
                for field in ("offset", "scale"):
                    values = torch.tensor(getattr(array.quant, field), dtype=torch.float32)
                    self._buffer(f"{array.name}_{field}", values.view(-1, 1).to(device))
        if projection is not None:
            self._buffer("w", torch.from_numpy(projection.components).to(device))
            self._buffer("mu", torch.from_numpy(projection.mean).to(device))

    def _buffer(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=False)

    def values(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """float32 values before storing: {name: (b, V, K, T)} (projected when there is one)."""
        outputs = encode_views(self.encoder, crops, flip=self.flip)
        if self.projection is not None:
            outputs = tuple(project(x, self.w, self.mu) for x in outputs)
        return dict(zip(NAMES, outputs, strict=True))

    @torch.inference_mode()
    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """crops uint8 (b, H, W, 3) -> the stored rows of each of NAMES, then the number of
        values of each crop clipped by quantization (int64 (b,) per name; zeros for float16)."""
        stored, clipped = [], []
        for name, x in self.values(crops).items():
            array = self.arrays[name]
            if array.quant is None:
                stored.append(x.to(torch.float16))
                clipped.append(torch.zeros(len(x), dtype=torch.int64, device=x.device))
                continue
            offset, scale = getattr(self, f"{name}_offset"), getattr(self, f"{name}_scale")
            codes, count = quantize_codes(x, offset, scale)
            stored.append(codes)
            clipped.append(count)
        return (*stored, *clipped)


@dataclass(frozen=True)
class FeatureBatch:
    """One batch's feature arrays on the host."""

    features: torch.Tensor
    features_cls: torch.Tensor
    clipped: torch.Tensor
    clipped_cls: torch.Tensor

    def named(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """({array name: rows}, {array name: clipped per crop}), as `EncodedBatch.named`."""
        arrays = {FEATURES: self.features, FEATURES_CLS: self.features_cls}
        return arrays, {FEATURES: self.clipped, FEATURES_CLS: self.clipped_cls}


class FeatureLauncher:
    """Launches the feature graph on one batch at a time, without waiting for it (as
    `BatchLauncher` does for the latents: the copies to the host queued behind the graph)."""

    def __init__(self, graph: FeatureGraph) -> None:
        self.graph = graph

    def launch(self, crops: torch.Tensor, keys: list[str]) -> Launched:
        return Launched(self.graph(crops), len(keys), make=FeatureBatch)
