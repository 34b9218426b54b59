"""Per-sample arrays declared once: round trips per array, reads of only what is asked for,
per-array checksums, per-position statistics, validate's and inspect's per-array reports."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import make_spec, write_store

from latent_store import (
    ArraySpec,
    LatentStore,
    SchemaMismatchError,
    StoreCorruptError,
    VaeInfo,
    calibrate,
    load_latents,
    validate_store,
)
from latent_store.finalize import position_stats
from latent_store.quantize import decode
from latent_store.reader import iter_shards
from latent_store.stats import channel_stats
from latent_store.summary import describe_store, format_description
from latent_store.verify import verify_store
from testkit.stores import random_rows

N, FAILED = 40, (5, 22)
WIDTHS = np.arange(1, 7).reshape(-1, 1)  # testkit's extra rows: channel c spreads c + 1
TOKENS = ArraySpec(
    name="tokens",
    shape=(6, 5),
    quant=calibrate(np.random.default_rng(1).standard_normal((256, 6, 5)) * WIDTHS, dims=1),
    variants=False,
    description="a quantized (C, T) array without variants",
)
HALF = ArraySpec(name="half", shape=(3, 4, 4), dtype="float16", description="fp16, per variant")
EXTRA = (TOKENS, HALF)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """40 samples with flips in 3 shards of 16 (two failures), latents and two more arrays."""
    path = tmp_path_factory.mktemp("arrays") / "s.zarr"
    return write_store(path, n=N, failures=FAILED, variants=2, extra=EXTRA)


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path / "s.zarr")
    return tmp_path / "s.zarr"


def _written() -> np.ndarray:
    return np.setdiff1d(np.arange(N), FAILED)


def test_every_declared_array_round_trips(pristine):
    spec = LatentStore(pristine).spec
    assert spec.names == ("latents", "tokens", "half") and spec.format_version == 2
    rows = random_rows(spec, 0, N)
    loaded = load_latents(pristine, names=["latents", "tokens", "half"])
    assert np.array_equal(loaded.indices, _written())
    assert loaded["tokens"].shape == (38, 6, 5) and loaded["tokens"].dtype == np.uint8
    assert loaded["half"].shape == (38, 2, 3, 4, 4) and loaded["half"].dtype == np.float16
    for name in ("tokens", "half"):
        assert np.array_equal(loaded[name], rows[name][_written()]), name
    values = decode(loaded["tokens"], TOKENS).double()  # dequantized on the channel axis of (C, T)
    floats = np.stack([np.random.default_rng([0, i]).standard_normal((6, 5)) for i in _written()])
    floats = torch.from_numpy(floats * WIDTHS)
    step, lo = (
        torch.tensor(v, dtype=torch.float64).view(-1, 1)
        for v in (TOKENS.quant.scale, TOKENS.quant.offset)
    )
    inside = (floats >= lo) & (floats <= lo + 255 * step)
    assert bool(((values - floats).abs() <= step / 2 + 1e-5)[inside].all())
    clipped = sum(r.arrays["tokens"].clipped for r in LatentStore(pristine).records())
    assert clipped == int((~inside).sum()) == 1  # counted from the codes at 0 or 255
    assert load_latents(pristine).arrays.keys() == {"latents"}  # by default, the latents only


def test_readers_read_only_the_arrays_they_name(store):
    (store / "half/c/1/0/0/0/0").unlink()  # the fp16 array of shard 1, gone
    assert len(load_latents(store)) == 38  # latents and labels verify without it
    assert sum(len(s) for s in iter_shards(store, names=["tokens"])) == 38
    with pytest.raises(StoreCorruptError, match=r"shard 1: data file missing \(half/c/1"):
        load_latents(store, names=["latents", "half"])
    failed = {c.name: c.message for c in validate_store(store) if not c.ok}
    assert "half/c/1" in failed["checksums"]
    with pytest.raises(SchemaMismatchError, match="declares no array 'features'"):
        load_latents(store, names=["features"])


def test_each_array_is_verified_against_its_own_part(store):
    f = store / "tokens/c/2/0/0"
    data = bytearray(f.read_bytes())
    data[40] ^= 0xFF
    f.write_bytes(bytes(data))
    load_latents(store, names=["latents", "half"])  # the other arrays are intact
    with pytest.raises(StoreCorruptError, match="shard 2: checksum mismatch in tokens"):
        load_latents(store, names=["tokens"])
    record = json.loads(str(zarr.open_group(str(store))["shard_records"][0]))
    assert set(record["arrays"]) == {"latents", "tokens", "half", "labels"}


def test_an_edited_part_is_caught_without_reading_its_array(store):
    records = zarr.open_group(str(store), mode="r+")["shard_records"]
    record = json.loads(str(records[1]))
    record["arrays"]["half"]["checksum"] = "xxh3-128:" + "0" * 32
    records[1] = json.dumps(record)
    with pytest.raises(StoreCorruptError, match=r"shard 1: checksum mismatch \(recorded .* parts"):
        load_latents(store)  # reads latents and labels only: the record's checksum disagrees


def _pooled(store: Path, name: str) -> np.ndarray:
    """Every written sample's values of an array, variants pooled: (m, *shape) float64."""
    array = LatentStore(store).spec.array(name)
    values = decode(load_latents(store, names=[name])[name], array).double().numpy()
    return values.reshape(-1, *array.shape)


@pytest.mark.parametrize("name", ["latents", "tokens", "half"])
def test_per_position_statistics_are_those_of_the_values(pristine, name):
    values = _pooled(pristine, name)  # < STATS_SAMPLES_PER_SHARD per shard: every sample counts
    row = position_stats(LatentStore(pristine), name)
    assert row.shape == (2, *LatentStore(pristine).spec.array(name).shape)
    np.testing.assert_allclose(row[0], values.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(row[1], values.var(0), rtol=1e-4, atol=1e-5)
    section = LatentStore(pristine).summary["arrays"][name]
    mean, std = channel_stats(row)
    assert section["channel_mean"] == mean and section["count"] == len(values)
    per_channel = np.moveaxis(values, 1, 0).reshape(values.shape[1], -1)
    np.testing.assert_allclose(std, per_channel.std(1), rtol=1e-4)
    if name == "latents":  # where v1 stores have them, and what channel_stats normalizes with
        assert LatentStore(pristine).summary["channel_mean"] == mean


def test_statistics_of_wide_arrays_stay_out_of_the_json(tmp_path):
    """RAE's DINOv2-B tokens: 768 x 16 x 16 per variant. Records and summary stay small."""
    wide = ArraySpec(name="feats", shape=(768, 16, 16), dtype="float16", variants=False)
    path = write_store(tmp_path / "wide.zarr", n=6, shard=4, chunk=2, extra=(wide,))
    group = zarr.open_group(str(path))
    assert max(len(r) for r in group["shard_records"][:]) < 2_000
    assert len((path / "zarr.json").read_bytes()) < 100_000  # per channel; per position: ~8 MB
    assert group["feats_stats"].shape == (3, 2, 768, 16, 16)
    assert position_stats(LatentStore(path), "feats").shape == (2, 768, 16, 16)
    assert all(c.ok for c in validate_store(path))


def _edit_stats(store: Path, name: str, row: int) -> None:
    arr = zarr.open_group(str(store), mode="r+")[f"{name}_stats"]
    values = arr[row]
    values[0, 0] += 1.0
    arr[row] = values


def test_statistics_rows_are_verified(store, tmp_path):
    assert all(c.ok for c in validate_store(store))
    _edit_stats(store, "tokens", 1)  # a shard's row: validate recomputes, readers never read it
    failed = {c.name: c.message for c in validate_store(store) if not c.ok}
    assert re.search("shard 1: the statistics of 'tokens' do not match", failed["summary"])
    verify_store(LatentStore(store))
    other = tmp_path / "other.zarr"
    shutil.copytree(store, other)
    _edit_stats(other, "latents", 3)  # the store's row, what normalization reads: refused
    with pytest.raises(StoreCorruptError, match=r"summary .* does not match"):
        load_latents(other)


def test_validate_and_inspect_report_each_array(pristine):
    checks = {c.name: c for c in validate_store(pristine)}
    assert all(c.ok for c in checks.values())
    quant = checks["quantization"].message
    assert re.search(r"latents: clipped \S+, error \d+\.\d% of std \(worst channel \d", quant)
    assert "tokens: clipped" in quant and "half" not in quant  # fp16 is not quantized
    d = describe_store(pristine)
    assert [a["name"] for a in d["arrays"]] == ["latents", "tokens", "half"]
    tokens = d["arrays"][1]
    assert tokens["row_shape"] == [6, 5] and tokens["bytes_per_sample"] == 30
    assert d["arrays"][2]["bytes_per_sample"] == 2 * 3 * 4 * 4 * 2
    text = format_description(d)
    assert "array        tokens: 6x5 uint8 affine-uint8-per-channel, 30 B/sample" in text
    want = "(AutoencoderKL, f8, 4 channels, pixels in [-1, 1], gaussian posterior, scaling 0.5)"
    assert want in text
    rae = VaeInfo(id="rae", cls="AutoencoderRAE", latent_channels=768, downsampling=16,
                  image_range=(0.0, 1.0), posterior_kind="deterministic",
                  normalized_by="latents_mean/latents_std")  # fmt: skip
    text = format_description({**d, "vae": asdict(rae)})
    want = "(AutoencoderRAE, f16, 768 channels, pixels in [0, 1], deterministic posterior, "
    assert want + "scaling 1.0, normalized by latents_mean/latents_std)" in text


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(name="labels", shape=(2,)), "reserved"),
        (dict(name="x_stats", shape=(2,)), "reserved"),
        (dict(name="Feat", shape=(2,)), "lowercase"),
        (dict(name="f", shape=()), r"needs \(C, ...\)"),
        (dict(name="f", shape=(2,), dtype="int64"), "dtype 'int64'"),
        (dict(name="f", shape=(3,), quant=TOKENS.quant), "6 channels, the array 3"),
        (dict(name="f", shape=(6,), quant=TOKENS.quant, dtype="float16"), "quantized arrays"),
    ],
)
def test_bad_declarations(kw, match):
    with pytest.raises(SchemaMismatchError, match=match):
        ArraySpec(**kw)


def test_a_spec_declares_latents_first_and_logstd_with_moments():
    with pytest.raises(SchemaMismatchError, match="declared twice"):
        make_spec(8, extra=(TOKENS, TOKENS))
    with pytest.raises(SchemaMismatchError, match="'logstd' array is declared with"):
        make_spec(8, extra=(ArraySpec(name="logstd", shape=(4, 8, 8), dtype="float16"),))
    with pytest.raises(SchemaMismatchError, match="format v1 stores hold"):
        make_spec(8, extra=(TOKENS,), format_version=1)
