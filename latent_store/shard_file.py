"""Read a whole shard of an uncompressed array from a local file with one read and no copy.

zarr decodes a shard into a fresh output array: one more copy of every byte after the read, which
halves stream mode's throughput for wide latents (RAE's 196 KB per sample; `bench/bench_stream.py`).
The store's arrays are uncompressed (`create_store`), so on a local disk a whole shard's bytes are
its values: `read_shard_file` reads them into the array it returns (`readinto`), where the file is
laid out as zarr v3 writes a whole shard (the sharding codec's inner chunks in order from byte 0,
their index at the end: zarr v3 sharding specification), or as one uncompressed chunk. Anything
else (compression, another layout, a missing or short file, an index that does not describe
contiguous full chunks) returns None, and the caller reads through zarr as before; the shard's
checksum (`latent_store.verify`) still checks what was read.

`Buffers` hands the arrays it made out again once nothing else holds them: a shard read into
memory the process already has costs no page faults (fresh memory is zeroed page by page, and on a
VM may first have to come back from the host: stalls of up to 0.8 s per 50 MB shard on the dev VM,
bench/RESULTS.md).
"""

from __future__ import annotations

import math
import sys
import threading
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation

READ_BLOCK = 1 << 20  # bytes per read: hashed while in the CPU's cache
INDEX_ENTRY = 16  # (offset, nbytes) as two little-endian uint64 per inner chunk
CRC32C_BYTES = 4
_UNHELD = 3  # references to a pooled array no one else holds: the pool's list, the loop, the call


class Buffers:
    """Output arrays for `read_shard_file`, reused once nothing outside holds them.

    An array is handed out again only when no view, slice or other reference to it is left (numpy
    views and slices reference the array that owns the memory, so its reference count says so);
    else a new one is made. It keeps at most `keep` arrays (`iter_shards`, the trainer's stream
    mode: as many as were held at once).
    """

    def __init__(self, keep: int = 16) -> None:
        self._arrays: list[np.ndarray] = []
        self._keep = keep
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An array of `shape` and `dtype` (uninitialized: a reused one holds its old values)."""
        dtype = np.dtype(dtype)
        with self._lock:
            for a in self._arrays:
                if a.shape == shape and a.dtype == dtype and sys.getrefcount(a) <= _UNHELD:
                    return a
            made = np.empty(shape, dtype)
            if len(self._arrays) < self._keep:
                self._arrays.append(made)
            return made


def _raw_bytes(codecs) -> bool:
    """Whether `codecs` store values as their bytes in native order (no compression)."""
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return False
    endian = codecs[0].endian
    return endian is None or endian.value == sys.byteorder


def _inner_layout(arr: zarr.Array) -> tuple[tuple[int, ...], int] | None:
    """(inner chunk shape, index bytes) of a sharded array stored as raw bytes, else None;
    (chunk shape, 0) for an unsharded one; None when the chunk splits any axis but the first."""
    codecs = arr.metadata.codecs
    if _raw_bytes(codecs):
        chunk, index = tuple(arr.metadata.chunk_grid.chunk_shape), 0
    elif len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        sharding = codecs[0]
        if (
            not _raw_bytes(sharding.codecs)
            or sharding.index_location != ShardingCodecIndexLocation.end
        ):
            return None
        kinds = [type(c) for c in sharding.index_codecs]
        if kinds not in ([BytesCodec], [BytesCodec, Crc32cCodec]):
            return None
        chunk = tuple(sharding.chunk_shape)
        per_shard = arr.metadata.chunk_grid.chunk_shape[0] // chunk[0]
        index = per_shard * INDEX_ENTRY + (CRC32C_BYTES if len(kinds) == 2 else 0)
    else:
        return None
    return (chunk, index) if chunk[1:] == arr.shape[1:] else None


def read_shard_file(
    arr: zarr.Array, path: Path, rows: int, hasher=None, buffers: Buffers | None = None
) -> np.ndarray | None:
    """The first `rows` rows of the shard (or chunk) file `path` of `arr`, or None (see above).

    hasher: a hash object (`update(bytes)`) fed the returned rows' bytes block by block as they
    arrive, while each block is still in the CPU's cache: a checksum without a second pass over
    the shard. Fed nothing useful when None is returned. buffers: where the array comes from
    (`Buffers`: reused memory); a new one without.
    """
    layout = _inner_layout(arr)
    if layout is None:
        return None
    (chunk_rows, *sample), index_bytes = layout
    chunks = math.ceil(rows / chunk_rows)
    chunk_bytes = chunk_rows * math.prod(sample) * arr.dtype.itemsize
    shape = (chunks * chunk_rows, *sample)
    out = buffers.empty(shape, arr.dtype) if buffers is not None else np.empty(shape, arr.dtype)
    try:
        with open(path, "rb", buffering=0) as f:
            size = f.seek(0, 2)
            if index_bytes:
                f.seek(size - index_bytes)
                entries = np.frombuffer(f.read(index_bytes // INDEX_ENTRY * INDEX_ENTRY), "<u8")
                offsets, sizes = entries[0 : 2 * chunks : 2], entries[1 : 2 * chunks : 2]
                if (
                    not np.array_equal(offsets, np.arange(chunks) * chunk_bytes)
                    or (sizes != chunk_bytes).any()
                ):
                    return None  # not full inner chunks one after another from byte 0
            elif size != chunk_bytes:
                return None
            f.seek(0)
            view, done, wanted = memoryview(out).cast("B"), 0, rows * math.prod(out.shape[1:])
            wanted *= out.itemsize
            while done < out.nbytes and (n := f.readinto(view[done : done + READ_BLOCK])):
                if hasher is not None and done < wanted:
                    hasher.update(view[done : min(done + n, wanted)])
                done += n
    except (OSError, ValueError):  # missing (zarr reads the fill value), short or unreadable
        return None
    return out[:rows] if done == out.nbytes else None
