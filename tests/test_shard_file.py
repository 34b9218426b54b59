"""Whole local shards read with one read (latent_store.shard_file): zarr's values, or zarr decides."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import write_store

from latent_store import LatentStore
from latent_store.checksums import shard_checksum
from latent_store.shard_file import read_shard_file


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
