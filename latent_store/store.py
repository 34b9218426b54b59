"""Create and open latent stores. `LatentStore` is the handle every other module works through."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr
import zarr.errors
from zarr.core.sync import sync
from zarr.storage import LocalStore

from foundation.urls import check_options_apply, is_url
from latent_store.arrays import BASE_RECORDS, LABELS, RECORDS_SUFFIX, STATS_SUFFIX, ArraySpec
from latent_store.checksums import CHECKSUM, CHECKSUMS
from latent_store.errors import (
    LatentditError,
    SchemaMismatchError,
    StoreCorruptError,
    StoreExistsError,
    StoreIncompleteError,
    StoreNotFoundError,
)
from latent_store.provenance import PROVENANCE_KEY, seal
from latent_store.retry import retry
from latent_store.schema import ATTRS_KEY, LABEL_FILL, ShardRecord, StoreSpec
from latent_store.shard_file import Buffers, read_shard_file

log = logging.getLogger(__name__)

SUMMARY_KEY = "summary"
# what zarr raises on a truncated, empty or hand-edited zarr.json (json errors are ValueErrors)
MALFORMED = (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError)


def _malformed(what: str, error: Exception) -> StoreCorruptError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return StoreCorruptError(
        f"{what} is malformed ({reason}): truncated or edited? Restore it from a copy, or "
        "re-encode the store with the same command and a new --out"
    )


def _open_group(path: str | os.PathLike, mode: str, storage_options: dict | None) -> zarr.Group:
    """The store's root group; at a URL through fsspec, opening retried like every read."""
    check_options_apply(path, storage_options)
    if not is_url(path):
        return _open_group_once(str(path), mode, {})
    return retry(lambda: _open_group_once(str(path), mode, storage_options), f"{path}")


def _open_group_once(path: str, mode: str, storage_options: dict | None) -> zarr.Group:
    kw = {"storage_options": storage_options or {}} if is_url(path) else {}
    try:
        return zarr.open_group(path, mode=mode, zarr_format=3, **kw)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise StoreNotFoundError(
            f"{path}: no latent store here; create one with `latentdit encode SOURCE --out {path}`"
        ) from None
    except NotADirectoryError:
        raise StoreNotFoundError(
            f"{path}: a file, not a latent store (a store is a folder or an fsspec URL)"
        ) from None
    except ImportError as e:  # fsspec names the package its driver for this scheme needs
        raise StoreNotFoundError(f"{path}: {e} (an fsspec driver for this URL)") from None
    except MALFORMED as e:
        raise _malformed(f"{path}/zarr.json (the store's metadata)", e) from None


def create_store(
    path: str | os.PathLike,
    spec: StoreSpec,
    keys: Sequence[str],
    *,
    storage_options: dict | None = None,
) -> LatentStore:
    """Create the arrays and metadata of a new store (a folder or a URL). Call from one process.

    `keys` (one source id per sample, length `spec.num_samples`) are written now, so the sample
    order is fixed before any encoding starts.
    """
    if len(keys) != spec.num_samples:
        raise SchemaMismatchError(f"{len(keys)} keys for {spec.num_samples} samples")
    check_options_apply(path, storage_options)
    if _holds_something(path, storage_options):
        raise StoreExistsError(f"{path} already exists and is not empty; choose another --out")
    kw = {"storage_options": storage_options or {}} if is_url(path) else {}
    attrs = spec.to_attrs()
    attrs[PROVENANCE_KEY] = seal(attrs, np.asarray(keys, dtype=object).astype(str))
    group = zarr.create_group(str(path), zarr_format=3, attributes={ATTRS_KEY: attrs}, **kw)
    for array in spec.base_arrays:
        create_arrays(group, spec, array)
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
    group.create_array(BASE_RECORDS, shape=(spec.num_shards,), dtype=str, chunks=(1,))
    log.info("created store %s: %d samples in %d shards", path, spec.num_samples, spec.num_shards)
    return LatentStore(path, storage_options=storage_options)


def array_layouts(spec: StoreSpec, array: ArraySpec) -> dict[str, tuple[str | None, tuple, tuple]]:
    """The Zarr arrays a declared array lives in: {name: (dtype, shape, chunks)}.

    The data (N, [V,] *shape), sharded like the latents; its statistics rows (`latent_store.stats`)
    where the store keeps them; an added array's records.
    """
    row = spec.row_shape(array.name)
    layouts = {
        array.name: (array.dtype, (spec.num_samples, *row), (spec.chunk_size, *row)),
    }
    if spec.has_stats(array.name):
        stats = (2, *array.shape)
        layouts[array.name + STATS_SUFFIX] = ("float32", (spec.num_shards + 1, *stats), (1, *stats))
    if array.added:
        layouts[array.name + RECORDS_SUFFIX] = (None, (spec.num_shards,), (1,))
    return layouts


def create_arrays(
    group: zarr.Group, spec: StoreSpec, array: ArraySpec, *, overwrite: bool = False
) -> None:
    """Create the Zarr arrays of one declared array (see `array_layouts`), empty."""
    for name, (dtype, shape, chunks) in array_layouts(spec, array).items():
        if dtype is None:  # records: one JSON string per shard
            group.create_array(name, shape=shape, dtype=str, chunks=chunks, overwrite=overwrite)
            continue
        shards = (spec.shard_size, *chunks[1:]) if name == array.name else None
        fill = np.nan if dtype == "float32" and name != array.name else 0
        group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            shards=shards,
            compressors=None,
            fill_value=fill,
            overwrite=overwrite,
        )


def _holds_something(path: str | os.PathLike, storage_options: dict | None) -> bool:
    """Whether a folder is non-empty, or a URL already holds a Zarr node."""
    if not is_url(path):
        return Path(path).exists() and any(Path(path).iterdir())
    try:
        _open_group_once(str(path), "r", storage_options)
    except StoreNotFoundError:
        return False
    return True


class LatentStore:
    """An open store: its spec, arrays and the completion state of its shards."""

    def __init__(
        self, path: str | os.PathLike, *, mode: str = "r", storage_options: dict | None = None
    ) -> None:
        self.path = str(path)
        self.storage_options = storage_options
        self._arrays: dict[str, zarr.Array] = {}
        self._lock = threading.Lock()
        self.group = _open_group(path, "r+" if mode != "r" else "r", storage_options)
        attrs = self.group.attrs.asdict()
        if ATTRS_KEY not in attrs:
            raise SchemaMismatchError(f"{path}: a Zarr group, but without latentdit metadata")
        if not isinstance(attrs[ATTRS_KEY], dict):
            raise _malformed(f"{path}/zarr.json: attribute {ATTRS_KEY!r}", TypeError("not a table"))
        self.attrs: dict = attrs[ATTRS_KEY]
        self.spec = StoreSpec.from_attrs(self.attrs)
        self.summary = self.attrs.get(SUMMARY_KEY)

    def array(self, name: str) -> zarr.Array:
        """An array of the store, opened once (on an object store each opening is a request;
        the lock keeps reader threads from each opening it)."""
        with self._lock:
            if name not in self._arrays:
                try:
                    self._arrays[name] = self.group[name]
                except KeyError:
                    raise SchemaMismatchError(f"{self.path}: array {name!r} is missing") from None
                except MALFORMED as e:
                    raise _malformed(f"{self.path}/{name}/zarr.json", e) from None
            return self._arrays[name]

    def reopen(self, mode: str) -> LatentStore:
        """The same store (same URL and storage options) opened again, e.g. for writing."""
        return LatentStore(self.path, mode=mode, storage_options=self.storage_options)

    def fetch(self, read, what: str):
        """`read()`, retried on an object store; on a local disk a failed read is damage."""
        return retry(read, what) if is_url(self.path) else read()

    @cached_property
    def local_root(self) -> Path | None:
        """The store's folder when it is on the local file system, else None."""
        return Path(self.group.store.root) if isinstance(self.group.store, LocalStore) else None

    def has_key(self, key: str) -> bool:
        """Whether the object (file) `key` exists, on any kind of store (no fill-value guesses)."""
        return retry(lambda: sync(self.group.store.exists(key)), f"{self.path}/{key}")

    def delete_key(self, key: str) -> None:
        sync(self.group.store.delete(key))

    def nbytes(self) -> int:
        """Bytes of every object (file) of the store."""
        return retry(lambda: sync(self.group.store.getsize_prefix("")), self.path)

    def shard_files(self, shard: int, names: Sequence[str] | None = None) -> list[str]:
        """Store keys (relative paths) of the files holding a shard's data: of the arrays `names`
        (default: those made with the store, and the labels), with their statistics rows."""
        keys = []
        for name in (*self.spec.base_names, LABELS) if names is None else names:
            stats = [name + STATS_SUFFIX] if name != LABELS and self.spec.has_stats(name) else []
            keys += [self.chunk_key(part, shard) for part in (name, *stats)]
        return keys

    def chunk_key(self, name: str, shard: int) -> str:
        """The store key of the file holding shard `shard` of array `name`."""
        arr = self.array(name)
        return f"{name}/{arr.metadata.encode_chunk_key((shard, *([0] * (arr.ndim - 1))))}"

    def records(self, name: str | None = None) -> list[ShardRecord | None]:
        """The completion record of every shard (None where the shard is not complete): of the
        arrays made with the store (`name` None), or of the added array `name`.

        A record that cannot be read (a torn chunk) counts as missing, like an unparsable one.
        """
        added = name is not None and self.spec.array(name).added
        key = name + RECORDS_SUFFIX if added else BASE_RECORDS
        arr = self.array(key)
        try:
            raw = self.fetch(lambda: arr[:].tolist(), f"{self.path}/{key}")
        except LatentditError:  # the store cannot be reached: not a torn record
            raise
        except Exception:  # zarr/numcodecs raise what their codecs raise; find the torn ones
            raw = [_read_record(arr, i) for i in range(arr.shape[0])]
        return [ShardRecord.from_json(str(t)) for t in raw]

    def missing_shards(self) -> list[int]:
        return [i for i, r in enumerate(self.records()) if r is None]

    def require_complete(
        self,
        shards: Sequence[int] | None = None,
        *,
        allow_incomplete: bool = False,
        records: Sequence[ShardRecord | None] | None = None,
        names: Sequence[str] = (),
    ) -> list[int]:
        """Return the complete shards among `shards` (default: all): their base records, and
        the records of the added arrays among `names`, are there.

        Raises StoreIncompleteError naming the incomplete ones, unless `allow_incomplete`.
        `records`: the store's records if already read (`records()`; on an object store each
        reading is a request per shard).
        """
        records = self.records() if records is None else records
        wanted = list(range(len(records)) if shards is None else shards)
        missing = [i for i in wanted if records[i] is None]
        if missing and not allow_incomplete:
            raise StoreIncompleteError(
                f"{self.path}: {len(missing)} of {len(wanted)} shards are not complete "
                f"({_format_ranges(missing)}); re-run the same encode command to finish it"
            )
        complete = [i for i in wanted if records[i] is not None]
        for array in (a for a in self.spec.added_arrays if a.name in names):
            added = self.records(array.name)
            unwritten = [i for i in complete if added[i] is None]
            if unwritten and not allow_incomplete:
                raise StoreIncompleteError(
                    f"{self.path}: array {array.name!r} is not written for {len(unwritten)} of "
                    f"{len(complete)} shards ({_format_ranges(unwritten)}); re-run the command "
                    "that adds it to finish it"
                )
            complete = [i for i in complete if added[i] is not None]
        return complete

    def read_shard(
        self,
        shard: int,
        names: Sequence[str] | None = None,
        *,
        digests: dict[str, str] | None = None,
        buffers: Buffers | None = None,
    ) -> dict[str, np.ndarray]:
        """Read one shard of the arrays `names` (default: those made with the store) and of the
        labels into RAM: {name: rows}.

        Each array's shard is one object, fetched whole, the arrays' objects at once (on an
        object store: concurrent requests); a failed fetch is retried, then raises
        StoreReadError naming the shard. digests: filled with the CHECKSUM of each array that was
        hashed as it was read (a local shard read whole), name -> "ALGORITHM:HEX". buffers:
        the arrays a local shard is read into (`shard_file.Buffers`).
        """
        start, stop = self.spec.shard_bounds(shard)
        wanted = [*(self.spec.base_names if names is None else names)]
        wanted += [LABELS] if LABELS not in wanted else []
        if self.local_root is not None:  # one read per file, no decoding copy (shard_file.py)
            hashers = {n: CHECKSUMS[CHECKSUM]() for n in wanted}
            local = [
                read_shard_file(
                    self.array(n),
                    self.local_root / self.chunk_key(n, shard),
                    stop - start,
                    hashers[n] if digests is not None else None,
                    buffers,
                )
                for n in wanted
            ]
            if all(a is not None for a in local):
                if digests is not None:
                    digests.update({n: f"{CHECKSUM}:{h.hexdigest()}" for n, h in hashers.items()})
                return dict(zip(wanted, local, strict=True))

        async def read(arrays: list[zarr.Array]) -> list:
            return await asyncio.gather(
                *(a.async_array.getitem(slice(start, stop)) for a in arrays)
            )

        return self.fetch(
            lambda: dict(zip(wanted, sync(read([self.array(n) for n in wanted])), strict=True)),
            f"{self.path}: shard {shard}",
        )


def _read_record(arr: zarr.Array, shard: int) -> str:
    try:
        return str(arr[shard])
    except Exception:
        log.warning(
            "shard %d: its completion record cannot be read; counted as not complete", shard
        )
        return ""


def open_store(
    path: str | os.PathLike | LatentStore,
    *,
    storage_options: dict | None = None,
    mode: str = "r",
) -> LatentStore:
    """Open an existing store: a folder or any fsspec URL zarr supports (`s3://bucket/x.zarr`).

    The one entry point for every command that takes a store. `storage_options` go to the
    fsspec driver (endpoint, credentials, ...); without them the driver's usual places apply
    (for S3: AWS_* variables, AWS_ENDPOINT_URL, ~/.aws). An open LatentStore is returned as is.
    """
    if isinstance(path, LatentStore):
        return path if mode == "r" else path.reopen(mode)
    return LatentStore(path, mode=mode, storage_options=storage_options)


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
