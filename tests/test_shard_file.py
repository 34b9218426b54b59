"""Whole local shards read with one read (latent_store.shard_file): zarr's values, or zarr decides."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import write_store

from latent_store import LatentStore
from latent_store.checksums import shard_checksum
from latent_store.reader import iter_shards, shard_order
from latent_store.shard_file import Buffers, read_shard_file


def _files(store: LatentStore, shard: int) -> dict:
    names = [*store.spec.base_names, "labels"]
    return {n: store.local_root / store.chunk_key(n, shard) for n in names}


@pytest.mark.parametrize("shard", [0, 1, 2])  # 2: the last, partial shard (40 of 48 rows)
def test_whole_shards_equal_what_zarr_reads(tmp_path, shard):
    store = LatentStore(write_store(tmp_path / "s.zarr", n=40, shard=16, chunk=4, variants=2))
    start, stop = store.spec.shard_bounds(shard)
    for name, path in _files(store, shard).items():
        got = read_shard_file(store.array(name), path, stop - start)
        want = store.array(name)[start:stop]
        assert got is not None and got.dtype == want.dtype and got.flags.writeable
        np.testing.assert_array_equal(got, want)
    assert store.read_shard(shard)["latents"].base is not None  # the read buffer, not a copy
    digests: dict[str, str] = {}
    data = store.read_shard(shard, digests=digests)  # hashed block by block as it is read
    assert digests.keys() == data.keys()
    for name, values in data.items():
        assert digests[name] == shard_checksum({name: values})  # the rows only, not the padding


def test_other_layouts_and_damaged_files_are_left_to_zarr(tmp_path):
    store = LatentStore(write_store(tmp_path / "s.zarr", n=32, shard=16, chunk=4))
    arr, path = store.array("latents"), _files(store, 0)["latents"]
    assert read_shard_file(arr, tmp_path / "missing", 16) is None
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # truncated: its index is gone
    assert read_shard_file(arr, path, 16) is None
    index = len(data) - (16 // 4) * 16 - 4  # 4 inner chunks: (offset, nbytes) each, then crc32c
    moved = np.frombuffer(data[index : index + 16], "<u8") + np.array([8, 0], "<u8")
    path.write_bytes(data[:index] + moved.tobytes() + data[index + 16 :])  # chunk 0 elsewhere
    assert read_shard_file(arr, path, 16) is None
    labels = _files(store, 1)["labels"]
    labels.write_bytes(labels.read_bytes()[:-2])  # a chunk file of the wrong size
    assert read_shard_file(store.array("labels"), labels, 16) is None
    packed = zarr.create_array(tmp_path / "z.zarr", shape=(16, 3), chunks=(8, 3), dtype="uint8")
    packed[:] = 1  # zarr's default codecs compress: not raw bytes
    assert read_shard_file(packed, tmp_path / "z.zarr" / "c" / "0" / "0", 8) is None


def test_buffers_are_handed_out_again_only_when_nothing_holds_them():
    pool = Buffers()
    a = pool.empty((4, 3), np.uint8)
    first = a.ctypes.data
    view = a[1:]  # numpy views reference the array that owns the memory
    del a
    held = pool.empty((4, 3), np.uint8)
    assert held.ctypes.data != first  # the view still holds the first array's memory
    del view
    assert pool.empty((4, 3), np.uint8).ctypes.data == first  # let go: reused
    assert pool.empty((4, 3), np.int16).ctypes.data != first  # another dtype
    assert pool.empty((5, 3), np.uint8).ctypes.data != first  # another shape
    assert held.ctypes.data != first


@pytest.mark.parametrize("verify", [True, False])
def test_stream_shards_reuse_memory_and_what_a_consumer_keeps_stays_intact(tmp_path, verify):
    store = LatentStore(write_store(tmp_path / "s.zarr", n=96, shard=16, chunk=4, variants=2))
    want = {s: store.read_shard(s) for s in range(store.spec.num_shards)}
    order = shard_order(store.spec.num_shards, seed=0, epoch=0, rank=0, world_size=1)
    kept = list(iter_shards(store, verify=verify))  # every shard held to the end: none reused
    assert len({s.arrays["latents"].ctypes.data for s in kept}) == len(kept)
    for shard, got in zip(order, kept, strict=True):
        np.testing.assert_array_equal(got.arrays["latents"], want[shard]["latents"])
        np.testing.assert_array_equal(got.labels, want[shard]["labels"])
    pool, seen = Buffers(), set()
    for _ in range(2):  # two epochs through one pool, each shard let go once it is read
        for shard, got in zip(order, iter_shards(store, verify=verify, buffers=pool), strict=True):
            np.testing.assert_array_equal(got.arrays["latents"], want[shard]["latents"])
            seen.add(id(got.arrays["latents"].base))
    pooled = {id(a) for a in pool._arrays}  # the arrays the pool made (malloc may reuse addresses)
    assert seen <= pooled and len(seen) <= 3  # in hand, fetched ahead, and one being let go
