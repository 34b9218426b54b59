"""The v1 store contract: what the group attributes and per-shard records hold.

Layout of a store (a Zarr v3 group):

    latents        uint8 (N, V, C, H, W)   chunks (chunk_size, V, C, H, W), shards of shard_size
    logstd         uint8 (N, V, C, H, W)   only with posterior "moments": quantized log std
    labels         int16 (N,)              fill -1; chunk = one shard
    keys           str   (N,)              source id of each sample, written at creation
    shard_records  str   (num_shards,)     one JSON record per shard; "" until that shard is done
    attrs["latentdit"]                     StoreSpec.to_attrs(), plus "summary" once finalized

V indexes the stored variants: VARIANTS[:V], the image and (optionally) its horizontal flip, each
encoded separately. Sample i lives in shard i // shard_size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from latent_store.errors import SchemaMismatchError
from latent_store.quant_params import QuantParams

FORMAT_NAME = "latentdit.latent_store"
FORMAT_VERSION = 1
ATTRS_KEY = "latentdit"
VARIANTS = ("image", "hflip")
POSTERIOR_MODES = ("mean", "sample", "moments")
LABEL_FILL = -1
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_SHARD_SIZE = 8192


# the facts of a VaeInfo that decide what stored latents mean to a consumer
DECODING_FACTS = (
    "cls",
    "latent_channels",
    "downsampling",
    "scaling_factor",
    "shift_factor",
    "image_range",
    "normalized_by",
    "latents_mean",
    "latents_std",
)


@dataclass(frozen=True, kw_only=True)
class VaeInfo:
    """Which autoencoder made the latents, and what a consumer needs to use them.

    Every value is read from the model (`foundation.autoencoders`), never typed in; the fields
    after `downsampling` came with the other families and default to an AutoencoderKL's, so v1
    stores read unchanged.
    """

    id: str  # hub id or local folder
    revision: str | None = None
    cls: str = "AutoencoderKL"  # the diffusers class: the autoencoder's family
    scaling_factor: float = 1.0  # z = (x - shift_factor) * scaling_factor for the diffusion model
    shift_factor: float | None = None
    latent_channels: int = 4
    downsampling: int = 8  # image pixels per latent position along a side
    image_range: tuple[float, float] = (
        -1.0,
        1.0,
    )  # the pixel values the model takes (black, white)
    posterior_kind: str = "gaussian"  # "gaussian" or "deterministic" (no sample / moments)
    normalized_by: str | None = None  # the model's own normalization, applied in the stored latents
    latents_mean: tuple[float, ...] | None = None  # per channel, carried by the config (VA-VAE)
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:  # JSON gives lists; compare and hash as tuples
        for name in ("image_range", "latents_mean", "latents_std"):
            if (value := getattr(self, name)) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))

    @classmethod
    def of(cls, autoencoder, *, id: str, revision: str | None = None) -> VaeInfo:
        """The record of a `foundation.autoencoders` Autoencoder (its facts, not its weights)."""
        return cls(
            id=id,
            revision=revision,
            cls=autoencoder.family,
            scaling_factor=autoencoder.scaling_factor,
            shift_factor=autoencoder.shift_factor,
            latent_channels=autoencoder.latent_channels,
            downsampling=autoencoder.spatial_factor,
            image_range=autoencoder.image_range,
            posterior_kind=autoencoder.posterior,
            normalized_by=autoencoder.normalized_by,
            latents_mean=autoencoder.latents_mean,
            latents_std=autoencoder.latents_std,
        )

    def channel_affine(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """`channels` (mean, std) with z = (x - mean) / std the diffusers convention of this
        model: (x - shift) * scaling, or (x - latents_mean) * scaling / latents_std."""
        if self.latents_mean is not None and self.latents_std is not None:
            return self.latents_mean, tuple(s / self.scaling_factor for s in self.latents_std)
        return (self.shift_factor or 0.0,) * channels, (1.0 / self.scaling_factor,) * channels

    def mismatches(
        self, other: VaeInfo, names: Sequence[str] = DECODING_FACTS
    ) -> list[tuple[str, Any, Any]]:
        """(field, mine, other's) for each of `names` that differs (floats to a relative 1e-6)."""
        out = []
        for name in names:
            a, b = getattr(self, name), getattr(other, name)
            if not _same(a, b):
                out.append((name, a, b))
        return out


def _same(a: Any, b: Any) -> bool:
    """Equal, floats (and tuples of them) to a relative 1e-6 (JSON round trips)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6)
    return a == b


@dataclass(frozen=True, kw_only=True)
class ClassInfo:
    """One class: its index (the label), its id (e.g. a wnid) and a human name."""

    index: int
    id: str
    name: str = ""


@dataclass(frozen=True, kw_only=True)
class StoreSpec:
    """Everything fixed when a store is created; stored as group attributes."""

    num_samples: int
    latent_shape: tuple[int, int, int]  # (C, H, W)
    quant: QuantParams
    vae: VaeInfo
    classes: tuple[ClassInfo, ...]
    variants: tuple[str, ...] = ("image",)
    posterior: str = "mean"
    logstd_quant: QuantParams | None = None  # required iff posterior == "moments"
    image_size: int = 256
    crop: str = "adm-center"  # the ADM / DiT center crop
    source: Mapping[str, Any] = field(default_factory=dict)  # kind, path, fingerprint...
    chunk_size: int = DEFAULT_CHUNK_SIZE
    shard_size: int = DEFAULT_SHARD_SIZE
    tool_version: str = ""
    command: str = ""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise SchemaMismatchError(f"a store needs at least one sample, got {self.num_samples}")
        if self.variants not in (VARIANTS[:1], VARIANTS):
            raise SchemaMismatchError(f"variants must be {VARIANTS[:1]} or {VARIANTS}")
        if self.posterior not in POSTERIOR_MODES:
            raise SchemaMismatchError(
                f"posterior {self.posterior!r} is not one of {', '.join(POSTERIOR_MODES)}"
            )
        if (self.posterior == "moments") != (self.logstd_quant is not None):
            raise SchemaMismatchError(
                "logstd_quant is required with, and only with, posterior 'moments'"
            )
        if self.shard_size % self.chunk_size:
            raise SchemaMismatchError(
                f"shard_size {self.shard_size} must be a multiple of chunk_size {self.chunk_size}"
            )
        if self.quant.channels != self.latent_shape[0]:
            raise SchemaMismatchError(
                f"quantization has {self.quant.channels} channels, latents have {self.latent_shape[0]}"
            )
        if [c.index for c in self.classes] != list(range(len(self.classes))):
            raise SchemaMismatchError("class indices must be 0..num_classes-1 in order")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample in `latents`: (V, C, H, W)."""
        return (len(self.variants), *self.latent_shape)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """[start, stop) sample indices of a shard."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range 0..{self.num_shards - 1}")
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    def to_attrs(self) -> dict:
        d = asdict(self)
        d["quant"] = self.quant.to_attrs()
        d["logstd_quant"] = self.logstd_quant.to_attrs() if self.logstd_quant else None
        d["source"] = dict(self.source)
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **d}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreSpec:
        if attrs.get("format") != FORMAT_NAME:
            raise SchemaMismatchError(f"not a latentdit store (format {attrs.get('format')!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise SchemaMismatchError(
                f"store format version {attrs.get('format_version')!r} is not supported; this "
                f"latentdit reads version {FORMAT_VERSION}: upgrade latentdit or re-encode"
            )
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in attrs.items() if k in known}
        try:
            d["latent_shape"] = tuple(d["latent_shape"])
            d["variants"] = tuple(d["variants"])
            d["quant"] = QuantParams.from_attrs(d["quant"])
            if d.get("logstd_quant"):
                d["logstd_quant"] = QuantParams.from_attrs(d["logstd_quant"])
            d["vae"] = VaeInfo(**d["vae"])
            d["classes"] = tuple(ClassInfo(**c) for c in d["classes"])
            return cls(**d)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise SchemaMismatchError(
                f"store metadata is malformed ({type(e).__name__}: {e}); restore its zarr.json "
                "or re-encode the store"
            ) from None

    def differences(self, other: StoreSpec, names: Sequence[str]) -> list[str]:
        """Describe fields (from `names`) whose values differ: 'vae: A (store) vs B (now)'."""
        a, b = self.to_attrs(), other.to_attrs()
        return [f"{n}: {a[n]!r} (store) vs {b[n]!r} (now)" for n in names if a[n] != b[n]]


@dataclass(frozen=True, kw_only=True)
class Failure:
    """A sample that could not be encoded: its global index, key and the reason."""

    index: int
    key: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class ShardRecord:
    """The completion marker of one shard, written only after its data is on disk."""

    shard: int
    start: int
    stop: int
    checksum: str  # "xxh3-128:<hex>" (older: "blake2b-128:<hex>") over latents, logstd, labels
    failures: tuple[Failure, ...] = ()
    image_modes: Mapping[str, int] = field(
        default_factory=dict
    )  # PIL modes seen, e.g. {"RGB": 8190}
    clipped: int = 0  # quantized values clipped to [0, 255]
    quantized: int = 0  # quantized values in total
    channel_sum: tuple[float, ...] = ()  # of dequantized latents, written samples, all variants
    channel_sumsq: tuple[float, ...] = ()
    channel_count: int = 0  # values per channel behind the sums

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ShardRecord | None:
        """Parse a record; None for an empty or torn one (the shard is then not complete)."""
        if not text:
            return None
        try:
            d = json.loads(text)
            d["failures"] = tuple(Failure(**f) for f in d["failures"])
            d["channel_sum"] = tuple(d["channel_sum"])
            d["channel_sumsq"] = tuple(d["channel_sumsq"])
            return cls(**d)
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def written(self) -> int:
        return self.stop - self.start - len(self.failures)
