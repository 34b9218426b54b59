"""Create and open latent stores. `LatentStore` is the handle every other module works through."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr
import zarr.errors
from zarr.storage import LocalStore

from latent_store.errors import (
    SchemaMismatchError,
    StoreExistsError,
    StoreIncompleteError,
    StoreNotFoundError,
)
from latent_store.schema import ATTRS_KEY, LABEL_FILL, ShardRecord, StoreSpec

log = logging.getLogger(__name__)

DATA_ARRAYS = ("latents", "logstd", "labels")  # arrays written shard by shard
SUMMARY_KEY = "summary"


def _open_group(path: str | os.PathLike, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise StoreNotFoundError(
            f"{path}: no latent store here; create one with `latentdit encode SOURCE --out {path}`"
        ) from None


def create_store(path: str | os.PathLike, spec: StoreSpec, keys: Sequence[str]) -> LatentStore:
    """Create the arrays and metadata of a new store. Call from one process only.

    `keys` (one source id per sample, length `spec.num_samples`) are written now, so the sample
    order is fixed before any encoding starts.
    """
    if len(keys) != spec.num_samples:
        raise SchemaMismatchError(f"{len(keys)} keys for {spec.num_samples} samples")
    if Path(str(path)).exists() and any(Path(str(path)).iterdir()):
        raise StoreExistsError(f"{path} already exists and is not empty; choose another --out")
    group = zarr.create_group(str(path), zarr_format=3, attributes={ATTRS_KEY: spec.to_attrs()})
    sample = spec.sample_shape
    latent_arrays = ["latents"] + (["logstd"] if spec.posterior == "moments" else [])
    for name in latent_arrays:
        group.create_array(
            name,
            shape=(spec.num_samples, *sample),
            dtype="uint8",
            chunks=(spec.chunk_size, *sample),
            shards=(spec.shard_size, *sample),
            compressors=None,
            fill_value=0,
        )
    group.create_array(
        "labels",
        shape=(spec.num_samples,),
        dtype="int16",
        chunks=(spec.shard_size,),
        compressors=None,
        fill_value=LABEL_FILL,
    )
    group.create_array("keys", shape=(spec.num_samples,), dtype=str, chunks=(spec.shard_size,))
    group["keys"][:] = np.asarray(keys, dtype=object).astype(str)
    group.create_array("shard_records", shape=(spec.num_shards,), dtype=str, chunks=(1,))
    log.info("created store %s: %d samples in %d shards", path, spec.num_samples, spec.num_shards)
    return LatentStore(path)


class LatentStore:
    """An open store: its spec, arrays and the completion state of its shards."""

    def __init__(self, path: str | os.PathLike, *, mode: str = "r") -> None:
        self.path = str(path)
        self.group = _open_group(path, "r+" if mode != "r" else "r")
        attrs = self.group.attrs.asdict()
        if ATTRS_KEY not in attrs:
            raise SchemaMismatchError(f"{path}: a Zarr group, but without latentdit metadata")
        self.spec = StoreSpec.from_attrs(attrs[ATTRS_KEY])
        self.summary = attrs[ATTRS_KEY].get(SUMMARY_KEY)

    def array(self, name: str) -> zarr.Array:
        try:
            return self.group[name]
        except KeyError:
            raise SchemaMismatchError(f"{self.path}: array {name!r} is missing") from None

    @cached_property
    def local_root(self) -> Path | None:
        """The store's folder when it is on the local file system, else None."""
        return Path(self.group.store.root) if isinstance(self.group.store, LocalStore) else None

    @property
    def data_arrays(self) -> list[str]:
        return [n for n in DATA_ARRAYS if n != "logstd" or self.spec.posterior == "moments"]

    def shard_files(self, shard: int) -> list[str]:
        """Store keys (relative paths) of the files holding a shard's data."""
        keys = []
        for name in self.data_arrays:
            arr = self.array(name)
            chunk = (shard, *([0] * (arr.ndim - 1)))
            keys.append(f"{name}/{arr.metadata.encode_chunk_key(chunk)}")
        return keys

    def records(self) -> list[ShardRecord | None]:
        """The completion record of every shard (None where the shard is not complete)."""
        raw = self.array("shard_records")[:]
        return [ShardRecord.from_json(str(t)) for t in raw]

    def missing_shards(self) -> list[int]:
        return [i for i, r in enumerate(self.records()) if r is None]

    def require_complete(
        self, shards: Sequence[int] | None = None, *, allow_incomplete: bool = False
    ) -> list[int]:
        """Return the complete shards among `shards` (default: all).

        Raises StoreIncompleteError naming the incomplete ones, unless `allow_incomplete`.
        """
        records = self.records()
        wanted = range(len(records)) if shards is None else shards
        missing = [i for i in wanted if records[i] is None]
        if missing and not allow_incomplete:
            raise StoreIncompleteError(
                f"{self.path}: {len(missing)} of {len(wanted)} shards are not complete "
                f"({_format_ranges(missing)}); re-run the same encode command to finish it"
            )
        return [i for i in wanted if records[i] is not None]

    def read_shard(self, shard: int) -> dict[str, np.ndarray]:
        """Read one shard's data arrays (latents, labels and logstd if present) into RAM."""
        start, stop = self.spec.shard_bounds(shard)
        return {name: self.array(name)[start:stop] for name in self.data_arrays}


def shard_checksum(data: dict[str, np.ndarray]) -> str:
    """Checksum of a shard's data, in the order of DATA_ARRAYS."""
    h = hashlib.blake2b(digest_size=16)
    for name in DATA_ARRAYS:
        if name in data:
            h.update(np.ascontiguousarray(data[name]).data)
    return f"blake2b-128:{h.hexdigest()}"


def open_store(path: str | os.PathLike) -> LatentStore:
    """Open an existing store for reading."""
    return LatentStore(path)


def _format_ranges(ids: Sequence[int], limit: int = 8) -> str:
    """'0-3, 7, 9-10' for [0, 1, 2, 3, 7, 9, 10], cut after `limit` runs."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = [f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:limit]]
    return "shards " + ", ".join(text) + (", ..." if len(runs) > limit else "")
