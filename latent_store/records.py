"""Per-shard completion records: written only after a shard's data is on disk, "" until then.

A record is one JSON string per shard in `shard_records` (the arrays declared at creation and the
labels) or in `<name>_records` (an array added later, `latent_store.added`). Since format v2 a
record has one part per array (and one for the labels): that array's checksum, its clipped count
and the checksum of its statistics row; its `checksum` is the digest of the parts' checksums, so a
reader of some arrays verifies what it read, and that no other part was edited, without reading
the rest. Format v1 records have no parts: their `checksum` covers the bytes of the latents, the
logstd and the labels, and they hold the latents' clipped count and per-channel sums themselves.
Checksums are "xxh3-128:<hex>" (records of older stores: "blake2b-128:<hex>").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

V1_FIELDS = ("clipped", "quantized", "channel_sum", "channel_sumsq", "channel_count")


@dataclass(frozen=True, kw_only=True)
class Failure:
    """A sample that could not be encoded: its global index, key and the reason."""

    index: int
    key: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class ArrayPart:
    """One array's part of a shard record."""

    checksum: str  # of the array's bytes in the shard
    clipped: int = 0  # quantized values clipped to [0, 255]
    quantized: int = 0  # quantized values of written samples
    stats: str = ""  # checksum of the shard's row of `<name>_stats` ("" for the labels)
    stats_count: int = 0  # rows (sample x variant) behind the statistics


@dataclass(frozen=True, kw_only=True)
class ShardRecord:
    """The completion marker of one shard, written only after its data is on disk."""

    shard: int
    start: int
    stop: int
    checksum: str = ""  # v1: of the data; v2: of the parts' checksums (module docstring)
    failures: tuple[Failure, ...] = ()
    image_modes: Mapping[str, int] = field(
        default_factory=dict
    )  # PIL modes seen, e.g. {"RGB": 8190}
    arrays: Mapping[str, ArrayPart] = field(default_factory=dict)  # format v2 and added arrays
    base: str = ""  # added arrays: `digest()` of the base record their rows were written against
    # format v1: of the latents
    clipped: int = 0  # quantized values clipped to [0, 255]
    quantized: int = 0  # quantized values in total
    channel_sum: tuple[float, ...] = ()  # of dequantized latents, written samples, all variants
    channel_sumsq: tuple[float, ...] = ()
    channel_count: int = 0  # values per channel behind the sums

    def to_json(self) -> str:
        d = asdict(self)
        drop = V1_FIELDS if self.arrays else ("arrays",)
        d = {k: v for k, v in d.items() if k not in drop and (k != "base" or v)}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ShardRecord | None:
        """Parse a record; None for an empty or torn one (the shard is then not complete)."""
        if not text:
            return None
        try:
            d = json.loads(text)
            d["failures"] = tuple(Failure(**f) for f in d.get("failures", ()))
            d["arrays"] = {k: ArrayPart(**v) for k, v in d.get("arrays", {}).items()}
            for key in ("channel_sum", "channel_sumsq"):
                d[key] = tuple(d.get(key, ()))
            if not (d["arrays"] or "channel_count" in d):
                return None  # neither a v1 nor a v2 record
            return cls(**d)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    @property
    def written(self) -> int:
        return self.stop - self.start - len(self.failures)

    def digest(self) -> str:
        """A digest of the whole record: what an added array's records name as their `base`."""
        return f"blake2b-128:{hashlib.blake2b(self.to_json().encode(), digest_size=16).hexdigest()}"
