"""The quantization parameters a store records (torch-free: the schema and configs import it).

    q = clamp(round((x - offset_c) / scale_c), 0, 255)      x̂ = offset_c + scale_c * q

The codec itself is `latent_store.quantize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEME = "affine-uint8-per-channel"
QMAX = 255
CHANNEL_DIM = -3  # latents are (..., C, H, W)


@dataclass(frozen=True, kw_only=True)
class QuantParams:
    """Per-channel affine quantization parameters.

    offset: the value that code 0 stands for, one per channel.
    scale: the step between neighbouring codes (> 0), one per channel.
    """

    offset: tuple[float, ...]
    scale: tuple[float, ...]

    def __post_init__(self) -> None:
        assert len(self.offset) == len(self.scale), "offset and scale need one entry per channel"

    @property
    def channels(self) -> int:
        return len(self.scale)

    def is_finite(self) -> bool:
        return all(math.isfinite(v) for v in (*self.offset, *self.scale)) and min(self.scale) > 0

    def to_attrs(self) -> dict:
        return {"scheme": SCHEME, "offset": list(self.offset), "scale": list(self.scale)}

    @classmethod
    def from_attrs(cls, attrs: dict) -> QuantParams:
        if attrs.get("scheme") != SCHEME:
            from latent_store.errors import SchemaMismatchError

            raise SchemaMismatchError(
                f"unknown quantization scheme {attrs.get('scheme')!r}; this version reads {SCHEME!r}"
            )
        return cls(offset=tuple(attrs["offset"]), scale=tuple(attrs["scale"]))
