"""The store contract: quantization, writer, reader, resume after a crash, validate."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import ROOT, make_spec, random_latents, write_store

from latent_store import (
    LatentStore,
    SchemaMismatchError,
    StoreExistsError,
    StoreIncompleteError,
    StoreNotFoundError,
    StoreWriter,
    calibrate,
    create_store,
    dequantize,
    iter_shards,
    load_latents,
    shard_order,
    validate_store,
)
from latent_store.quantize import quantize


def test_quantize_round_trip_within_half_step():
    x = torch.from_numpy(random_latents(128, variants=2))
    params = calibrate(x, lower_percentile=0, upper_percentile=100)
    q, clipped = quantize(x, params)
    assert q.dtype == torch.uint8 and clipped == 0
    err = (dequantize(q, params) - x).abs()
    half_step = torch.tensor(params.scale).view(-1, 1, 1) / 2
    assert bool((err <= half_step + 1e-6).all())
    assert float(err.max()) > 0.25 * float(half_step.min())  # not trivially exact


def test_quantize_counts_clipped_values():
    params = calibrate(random_latents(64))
    x = torch.from_numpy(random_latents(4))
    x[0, 0, 0, 0, :3] = 1e6
    _, clipped = quantize(x, params)
    assert clipped >= 3


def test_store_round_trip(tmp_path):
    n = 40
    x = random_latents(n, variants=2)
    quant = calibrate(x, lower_percentile=0, upper_percentile=100)
    path = write_store(tmp_path / "s.zarr", n, variants=2, quant=quant)
    arrays = load_latents(path)
    assert arrays.latents.shape == (n, 2, 4, 8, 8) and arrays.latents.dtype == np.uint8
    assert arrays.labels.tolist() == [i % 3 for i in range(n)]
    back = dequantize(arrays.latents, LatentStore(path).spec.quant)
    half_step = torch.tensor(quant.scale).view(-1, 1, 1) / 2
    assert bool(((back - torch.from_numpy(x)).abs() <= half_step + 1e-6).all())
    # readable with plain zarr
    g = zarr.open_group(str(path), mode="r")
    assert g["latents"].shape == (n, 2, 4, 8, 8) and g["labels"].fill_value == -1
    assert g.attrs["latentdit"]["summary"]["complete"]


def test_failed_samples_are_dropped_on_load(tmp_path):
    path = write_store(tmp_path / "s.zarr", 40, failures=(3, 17))
    arrays = load_latents(path)
    assert len(arrays) == 38 and 3 not in arrays.indices and 17 not in arrays.indices
    assert validate_store(path) and all(c.ok for c in validate_store(path))


def test_incomplete_store_refused_naming_shards(tmp_path):
    spec = make_spec(40)
    store = create_store(tmp_path / "s.zarr", spec, [f"k{i}" for i in range(40)])
    q, _ = quantize(random_latents(16), spec.quant)
    StoreWriter(store).write_shard(0, {"latents": q.numpy()}, np.zeros(16, np.int16))
    with pytest.raises(
        StoreIncompleteError, match=r"2 of 3 shards are not complete \(shards 1-2\)"
    ):
        load_latents(store.path)
    assert len(load_latents(store.path, allow_incomplete=True)) == 16
    assert len(load_latents(store.path, shards=[0])) == 16


def test_iter_shards_partitions_ranks_and_changes_per_epoch(tmp_path):
    path = write_store(tmp_path / "s.zarr", 100)  # 7 shards of 16
    seen = [
        np.concatenate([s.indices for s in iter_shards(path, seed=1, rank=r, world_size=2)])
        for r in (0, 1)
    ]
    assert sorted(np.concatenate(seen).tolist()) == list(range(100))
    assert shard_order(7, seed=1, epoch=0, rank=0, world_size=1) != shard_order(
        7, seed=1, epoch=1, rank=0, world_size=1
    )


def test_create_refuses_existing_and_open_refuses_missing(tmp_path, store_path):
    with pytest.raises(StoreExistsError, match="already exists"):
        create_store(store_path, make_spec(40), [f"k{i}" for i in range(40)])
    with pytest.raises(StoreNotFoundError, match="no latent store here"):
        LatentStore(tmp_path / "nope.zarr")


def test_writer_rejects_wrong_shape(tmp_path):
    spec = make_spec(40)
    store = create_store(tmp_path / "s.zarr", spec, [f"k{i}" for i in range(40)])
    with pytest.raises(SchemaMismatchError, match=r"store wants uint8\(16, 1, 4, 8, 8\)"):
        StoreWriter(store).write_shard(
            0, {"latents": np.zeros((16, 1, 4, 4, 4), np.uint8)}, np.zeros(16)
        )


def _same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ("latents", "labels", "keys", "shard_records"):
        np.testing.assert_array_equal(ga[name][:], gb[name][:])
    assert ga.attrs.asdict() == gb.attrs.asdict()


def test_sigkill_mid_shard_then_resume_equals_uninterrupted(tmp_path, python):
    job = str(ROOT / "tests" / "jobs" / "write_store_job.py")
    subprocess.run([python, job, str(tmp_path / "ref.zarr"), "60"], check=True, timeout=120)
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(
        [python, job, str(out), "60", "--pause-at", "2"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "DATA 2"  # shard 2's data is on disk, its record not
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    store = LatentStore(out)
    assert store.missing_shards() == [2, 3]
    leftover = store.local_root / store.shard_files(2)[0]
    leftover.write_bytes(leftover.read_bytes()[:100])  # a torn write, as a power cut would leave
    subprocess.run([python, job, str(out), "60"], check=True, timeout=120)
    _same_store(tmp_path / "ref.zarr", out)
    assert all(c.ok for c in validate_store(out))


# --- validate: every injected corruption is caught, with a message naming it -----------------


def _shard_file(path: Path, shard: int) -> Path:
    store = LatentStore(path)
    return store.local_root / store.shard_files(shard)[0]


def _delete_shard_file(path):
    _shard_file(path, 1).unlink()


def _flip_byte(path):
    f = _shard_file(path, 1)
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0xFF
    f.write_bytes(bytes(data))


def _label_out_of_range(path):
    zarr.open_group(str(path), mode="r+")["labels"][5] = 99


def _missing_marker(path):
    zarr.open_group(str(path), mode="r+")["shard_records"][2] = ""


def _wrong_shape_metadata(path):
    g = zarr.open_group(str(path), mode="r+")
    attrs = g.attrs["latentdit"]
    latents = {**attrs["arrays"][0], "shape": [4, 16, 16]}
    g.attrs["latentdit"] = {**attrs, "arrays": [latents, *attrs["arrays"][1:]]}


def _unwritten_sample(path):
    zarr.open_group(str(path), mode="r+")["labels"][7] = -1


CORRUPTIONS = [
    (_delete_shard_file, "checksums", r"shard 1: data file missing \(latents/c/1/0/0/0/0\)"),
    (_flip_byte, "checksums", r"shard 1: checksum mismatch"),
    (_label_out_of_range, "labels", r"shard 0: 1 labels outside \[0, 3\), first 99 at sample 5"),
    (_missing_marker, "completion", r"no completion marker for shards 2"),
    (
        _wrong_shape_metadata,
        "arrays",
        r"latents: shape \(40, 1, 4, 8, 8\) does not match metadata \(40, 1, 4, 16, 16\)",
    ),
    (
        _unwritten_sample,
        "labels",
        r"1 samples hold the fill value -1 without a recorded failure, first at sample 7",
    ),
]


@pytest.mark.parametrize(
    "corrupt,check,message", CORRUPTIONS, ids=[c[0].__name__ for c in CORRUPTIONS]
)
def test_validate_catches_corruption(store_path, corrupt, check, message):
    assert all(c.ok for c in validate_store(store_path))
    corrupt(store_path)
    failed = {c.name: c.message for c in validate_store(store_path) if not c.ok}
    assert check in failed, failed
    assert re.search(message, failed[check]), failed[check]


def test_validate_flags_excess_clipping(tmp_path):
    path = write_store(tmp_path / "s.zarr", 40, quant=calibrate(random_latents(8) * 0.1))
    failed = {c.name: c.message for c in validate_store(path) if not c.ok}
    assert "clipped" in failed["quantization"]


def test_records_are_json_with_checksums(store_path):
    records = zarr.open_group(str(store_path), mode="r")["shard_records"][:]
    rec = json.loads(str(records[0]))
    assert rec["checksum"].startswith("xxh3-128:") and rec["start"] == 0 and rec["stop"] == 16
