"""The store contract: what the group attributes hold, and the spec every other module reads.

Layout of a store (a Zarr v3 group), for each array the spec declares (`latent_store.arrays`):

    <name>          (N, V, *shape) or (N, *shape)   chunks of chunk_size samples, shards of shard_size
    <name>_stats    float32 (num_shards + 1, 2, *shape)   statistics (`latent_store.stats`; v2)
    <name>_records  str (num_shards,)   an added array's per-shard records (`latent_store.added`)
and for every store:
    labels          int16 (N,)   fill -1; chunk = one shard
    keys            str (N,)     source id of each sample, written at creation
    shard_records   str (num_shards,)   one JSON record per shard; "" until that shard is done
    attrs["latentdit"]            StoreSpec.to_attrs(), its "provenance" seal, "summary" once finalized

V indexes the stored variants: VARIANTS[:V], the image and (optionally) its horizontal flip, each
encoded separately. Sample i lives in shard i // shard_size.

Format v2 declares its arrays in the attributes ("arrays", and "added_arrays" for those declared
later). Format v1 stores (written before declarations) have `latents`, an optional `logstd`
(posterior "moments") and no statistics arrays; their attributes name the latents' shape and
quantization ("latent_shape", "quant", "logstd_quant"), from which their declaration is derived:
they are read as they are, never rewritten.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from latent_store.arrays import LATENTS, LOGSTD, ArraySpec, latent_arrays
from latent_store.errors import SchemaMismatchError
from latent_store.quant_params import QuantParams
from latent_store.records import Failure, ShardRecord

__all__ = ["ArraySpec", "ClassInfo", "Failure", "ShardRecord", "StoreSpec", "VaeInfo"]

FORMAT_NAME = "latentdit.latent_store"
FORMAT_VERSION = 2
FORMAT_VERSIONS = (1, 2)  # what this latentdit reads (and writes, to resume a v1 store)
ATTRS_KEY = "latentdit"
ADDED_KEY = "added_arrays"  # the declarations of arrays added to an existing store
VARIANTS = ("image", "hflip")
POSTERIOR_MODES = ("mean", "sample", "moments")
LABEL_FILL = -1
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_SHARD_SIZE = 8192
V1_ARRAY_FIELDS = ("latent_shape", "quant", "logstd_quant")  # v1's form of the declaration


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
    """Everything fixed when a store is created (and the arrays added since); group attributes."""

    num_samples: int
    arrays: tuple[ArraySpec, ...]  # the per-sample arrays: "latents" first, then the others
    vae: VaeInfo
    classes: tuple[ClassInfo, ...]
    variants: tuple[str, ...] = ("image",)
    posterior: str = "mean"
    image_size: int = 256
    crop: str = "adm-center"  # the ADM / DiT center crop
    source: Mapping[str, Any] = field(default_factory=dict)  # kind, path, fingerprint...
    chunk_size: int = DEFAULT_CHUNK_SIZE
    shard_size: int = DEFAULT_SHARD_SIZE
    tool_version: str = ""
    command: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "arrays", tuple(self.arrays))
        if self.num_samples < 1:
            raise SchemaMismatchError(f"a store needs at least one sample, got {self.num_samples}")
        if self.variants not in (VARIANTS[:1], VARIANTS):
            raise SchemaMismatchError(f"variants must be {VARIANTS[:1]} or {VARIANTS}")
        if self.posterior not in POSTERIOR_MODES:
            raise SchemaMismatchError(
                f"posterior {self.posterior!r} is not one of {', '.join(POSTERIOR_MODES)}"
            )
        if self.shard_size % self.chunk_size:
            raise SchemaMismatchError(
                f"shard_size {self.shard_size} must be a multiple of chunk_size {self.chunk_size}"
            )
        if [c.index for c in self.classes] != list(range(len(self.classes))):
            raise SchemaMismatchError("class indices must be 0..num_classes-1 in order")
        self._check_arrays()

    def _check_arrays(self) -> None:
        names = [a.name for a in self.arrays]
        if len(set(names)) != len(names):
            raise SchemaMismatchError(f"arrays declared twice: {names}")
        if not names or names[0] != LATENTS:
            raise SchemaMismatchError(f"the first declared array must be {LATENTS!r}, got {names}")
        latents = self.arrays[0]
        if len(latents.shape) != 3 or not latents.variants or latents.added:
            raise SchemaMismatchError(
                f"{LATENTS!r} must be (C, H, W) per variant, made at creation"
            )
        if (self.posterior == "moments") != (LOGSTD in self.base_names):
            raise SchemaMismatchError(
                f"a {LOGSTD!r} array is declared with, and only with, posterior 'moments'"
            )
        if [a.added for a in self.arrays] != sorted(a.added for a in self.arrays):
            raise SchemaMismatchError("arrays added to a store come after those made with it")
        if self.format_version not in FORMAT_VERSIONS:
            raise SchemaMismatchError(f"format version {self.format_version} is not supported")
        v1 = latent_arrays(latents.shape, latents.quant, self.logstd_quant) if latents.quant else ()
        if self.format_version == 1 and self.base_arrays != v1:
            raise SchemaMismatchError(
                "format v1 stores hold quantized latents (and logstd) only; declare other arrays "
                "in a v2 store"
            )

    @property
    def base_arrays(self) -> tuple[ArraySpec, ...]:
        """The arrays made with the store, written with the labels, covered by `shard_records`."""
        return tuple(a for a in self.arrays if not a.added)

    @property
    def added_arrays(self) -> tuple[ArraySpec, ...]:
        """The arrays declared on the store later, each with its own records."""
        return tuple(a for a in self.arrays if a.added)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.arrays)

    @property
    def base_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.base_arrays)

    def array(self, name: str) -> ArraySpec:
        """The declaration of `name`; SchemaMismatchError naming the declared ones otherwise."""
        for a in self.arrays:
            if a.name == name:
                return a
        raise SchemaMismatchError(
            f"the store declares no array {name!r} (it has {', '.join(self.names)})"
        )

    def has_stats(self, name: str) -> bool:
        """Whether `<name>_stats` exists: every array of a v2 store, and every added array."""
        return self.format_version >= 2 or self.array(name).added

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one latent."""
        return self.arrays[0].shape

    @property
    def quant(self) -> QuantParams | None:
        """The latents' quantization."""
        return self.arrays[0].quant

    @property
    def logstd_quant(self) -> QuantParams | None:
        """The posterior log std's quantization (posterior "moments"), else None."""
        return next((a.quant for a in self.arrays if a.name == LOGSTD and not a.added), None)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample in `latents`: (V, C, H, W)."""
        return self.row_shape(LATENTS)

    def row_shape(self, name: str) -> tuple[int, ...]:
        """Shape of one sample's row in array `name`."""
        return self.array(name).row_shape(len(self.variants))

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """[start, stop) sample indices of a shard."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range 0..{self.num_shards - 1}")
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    def with_added(self, array: ArraySpec) -> StoreSpec:
        """This spec with `array` declared after the others (`latent_store.added`)."""
        return replace(self, arrays=(*self.arrays, replace(array, added=True)))

    def to_attrs(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "arrays"}
        d.update(
            vae=asdict(self.vae),
            classes=[asdict(c) for c in self.classes],
            source=dict(self.source),
        )
        d["format"] = FORMAT_NAME
        if self.format_version == 1:
            d.update(latent_shape=list(self.latent_shape), quant=self.quant.to_attrs())
            d["logstd_quant"] = self.logstd_quant.to_attrs() if self.logstd_quant else None
        else:
            d["arrays"] = [a.to_attrs() for a in self.base_arrays]
        if self.added_arrays:
            d[ADDED_KEY] = [a.to_attrs() for a in self.added_arrays]
        return d

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreSpec:
        if attrs.get("format") != FORMAT_NAME:
            raise SchemaMismatchError(f"not a latentdit store (format {attrs.get('format')!r})")
        version = attrs.get("format_version")
        if version not in FORMAT_VERSIONS:
            raise SchemaMismatchError(
                f"store format version {version!r} is not supported; this latentdit reads "
                f"versions {', '.join(map(str, FORMAT_VERSIONS))}: upgrade latentdit or re-encode"
            )
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in attrs.items() if k in known}
        try:
            d["variants"] = tuple(d["variants"])
            d["vae"] = VaeInfo(**d["vae"])
            d["classes"] = tuple(ClassInfo(**c) for c in d["classes"])
            d["arrays"] = _declared(attrs, version)
            return cls(**d)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise SchemaMismatchError(
                f"store metadata is malformed ({type(e).__name__}: {e}); restore its zarr.json "
                "or re-encode the store"
            ) from None

    def differences(self, other: StoreSpec, names: Sequence[str]) -> list[str]:
        """Describe fields (from `names`) whose values differ: 'vae: A (store) vs B (now)'.

        "arrays" compares the declarations' layouts (names, shapes, dtypes, quantization scheme),
        not the calibrated parameters: a store's quantization is its own.
        """
        a, b = self.to_attrs(), other.to_attrs()
        a["arrays"], b["arrays"] = ([x.layout() for x in s.base_arrays] for s in (self, other))
        return [f"{n}: {a[n]!r} (store) vs {b[n]!r} (now)" for n in names if a[n] != b[n]]


def _declared(attrs: Mapping[str, Any], version: int) -> tuple[ArraySpec, ...]:
    """The arrays a store's attributes declare; for v1, derived from its latents' fields."""
    if version == 1:
        logstd = attrs.get("logstd_quant")
        base = latent_arrays(
            tuple(attrs["latent_shape"]),
            QuantParams.from_attrs(attrs["quant"]),
            QuantParams.from_attrs(logstd) if logstd else None,
        )
    else:
        base = tuple(ArraySpec.from_attrs(a) for a in attrs["arrays"])
    added = tuple(ArraySpec.from_attrs(a, added=True) for a in attrs.get(ADDED_KEY) or ())
    return base + added
