"""The declaration of a store's per-sample arrays: what `StoreSpec.arrays` lists.

    ArraySpec(name="latents", shape=(4, 32, 32), quant=QuantParams(...), description="...")

An array holds one row per sample: (N, V, *shape) with the variants axis (the image and its flip,
each encoded separately), (N, *shape) without. `shape` is one variant's, channel first: (C, H, W)
for latents, (C, T) for a vision encoder's T tokens of width C. A quantized array is uint8 with
per-channel affine parameters (`latent_store.quant_params`), inverted by `quantize.decode`; an
unquantized one holds its values as they are (e.g. float16). Every writer, reader, verifier,
checksum and statistic loops over these declarations, so adding an array touches its declaration
and its consumer only.

Arrays declared when the store is created are written whole shard by shard with the labels, and
the shard's record covers them; an array declared later on a complete store (`added`, see
`latent_store.added`) has its own per-shard records `<name>_records`. Each numeric array has its
statistics beside it in `<name>_stats` (`latent_store.stats`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from latent_store.errors import SchemaMismatchError
from latent_store.quant_params import QuantParams

LATENTS, LOGSTD, LABELS = "latents", "logstd", "labels"
RECORDS_SUFFIX = "_records"  # an added array's per-shard records
STATS_SUFFIX = "_stats"  # an array's statistics: per shard, and the store's
BASE_RECORDS = "shard_records"  # the records of the arrays declared at creation, and the labels
RESERVED = (LABELS, "keys", BASE_RECORDS)
ITEMSIZE = {"uint8": 1, "float16": 2, "float32": 4}  # stored dtypes; quantized arrays are uint8
DTYPES = tuple(ITEMSIZE)
NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
DESCRIPTIONS = {
    LATENTS: "the VAE's latents (posterior mean, or a sample), per variant",
    LOGSTD: "log standard deviation of the VAE posterior (posterior 'moments'), per variant",
}


@dataclass(frozen=True, kw_only=True)
class ArraySpec:
    """One per-sample array of a store (see the module docstring)."""

    name: str
    """The array's name in the store (lowercase letters, digits, underscores)."""
    shape: tuple[int, ...]
    """One variant's shape, channel first: (C, ...)."""
    quant: QuantParams | None = None
    """Per-channel affine uint8 quantization (one offset and scale per channel); None: stored as is."""
    dtype: str = "uint8"
    """Stored dtype: uint8 (quantized, or raw codes) or float16 / float32 (unquantized)."""
    variants: bool = True
    """Whether each sample has one row per variant (N, V, *shape), else one row (N, *shape)."""
    description: str = ""
    """What the array holds, for `inspect`."""
    added: bool = False
    """Declared on an existing store (`latent_store.added`): it has its own per-shard records."""
    made_by: Mapping[str, Any] | None = field(default=None, hash=False)
    """How the values were made, as JSON (e.g. the vision encoder, its weights' digest and
    preprocessing); sealed with the declaration, left out of `layout`. Two entries have a meaning
    here: "attached" ({key: checksum}) names small arrays stored beside the data
    (`latent_store.attached`, e.g. a fitted projection), and "quantization_error" (e.g.
    {"relative_rms": 0.01, "cosine": 0.9999}) is what the writer measured, which `validate`
    reports."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        what = f"array {self.name!r}"
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise SchemaMismatchError(
                f"{what}: a name is 1-63 lowercase letters, digits or underscores, first a letter"
            )
        if self.name in RESERVED or self.name.endswith((RECORDS_SUFFIX, STATS_SUFFIX)):
            raise SchemaMismatchError(
                f"{what}: the name is reserved (also no {RECORDS_SUFFIX} or {STATS_SUFFIX} "
                "ending); choose another"
            )
        if not self.shape or min(self.shape) < 1:
            raise SchemaMismatchError(f"{what}: shape {self.shape} needs (C, ...) sizes >= 1")
        if self.dtype not in DTYPES:
            raise SchemaMismatchError(f"{what}: dtype {self.dtype!r} is not one of {DTYPES}")
        if self.quant is not None and self.dtype != "uint8":
            raise SchemaMismatchError(f"{what}: quantized arrays are uint8, not {self.dtype}")
        if self.made_by is not None and not isinstance(self.made_by, Mapping):
            raise SchemaMismatchError(f"{what}: made_by must be a table, not {self.made_by!r}")
        if self.quant is not None and self.quant.channels != self.shape[0]:
            raise SchemaMismatchError(
                f"{what}: quantization has {self.quant.channels} channels, the array {self.shape[0]}"
            )

    @property
    def channels(self) -> int:
        return self.shape[0]

    def row_shape(self, variants: int) -> tuple[int, ...]:
        """One sample's row: (V, *shape) with the variants axis, else `shape`."""
        return (variants, *self.shape) if self.variants else self.shape

    def nbytes_per_sample(self, variants: int) -> int:
        return math.prod(self.row_shape(variants)) * ITEMSIZE[self.dtype]

    def to_attrs(self) -> dict[str, Any]:
        attrs = {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "quant": self.quant.to_attrs() if self.quant else None,
            "variants": self.variants,
            "description": self.description,
        }
        if self.made_by is not None:  # absent otherwise: earlier stores' attributes unchanged
            attrs["made_by"] = dict(self.made_by)
        return attrs

    def layout(self) -> dict[str, Any]:
        """What a writer must agree on (the attributes less the calibrated parameters)."""
        d = self.to_attrs()
        d["quant"] = d["quant"]["scheme"] if d["quant"] else None
        d.pop("description")
        d.pop("made_by", None)
        return d

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], *, added: bool = False) -> ArraySpec:
        quant = attrs.get("quant")
        return cls(
            name=attrs["name"],
            shape=tuple(attrs["shape"]),
            dtype=attrs["dtype"],
            quant=QuantParams.from_attrs(quant) if quant else None,
            variants=bool(attrs["variants"]),
            description=str(attrs.get("description", "")),
            added=added,
            made_by=attrs.get("made_by"),
        )


def latent_arrays(
    shape: tuple[int, int, int], quant: QuantParams, logstd_quant: QuantParams | None = None
) -> tuple[ArraySpec, ...]:
    """The declarations of a VAE's latents (and, with `logstd_quant`, of its posterior log std)."""
    arrays = [ArraySpec(name=LATENTS, shape=shape, quant=quant, description=DESCRIPTIONS[LATENTS])]
    if logstd_quant is not None:
        arrays.append(
            ArraySpec(
                name=LOGSTD, shape=shape, quant=logstd_quant, description=DESCRIPTIONS[LOGSTD]
            )
        )
    return tuple(arrays)
