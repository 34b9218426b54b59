"""Arrays added to a complete store later: declared and sealed honestly, written shard by shard
(resumable), verified by every reader that reads them, reported by validate, fed to the trainer."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import ROOT, random_latents, write_store
from test_v1_stores import ASSETS

from latent_store import (
    AddedArrayWriter,
    LatentStore,
    SchemaMismatchError,
    StoreCorruptError,
    StoreIncompleteError,
    StoreWriter,
    add_array,
    finalize_store,
    load_latents,
    open_store,
    validate_store,
)
from latent_store.finalize import position_stats
from latent_store.quantize import quantize
from latent_store.verify import verify_store
from testkit.stores import copy_declaration, fill_added
from trainer.data import BatchLayout, build_batches
from trainer.normalization import normalization_from_store

JOB = str(ROOT / "tests" / "jobs" / "add_array_job.py")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """40 samples with flips in 3 shards of 16 (sample 5 a recorded failure)."""
    return write_store(tmp_path_factory.mktemp("base") / "s.zarr", n=40, failures=(5,), variants=2)


@pytest.fixture
def store(base, tmp_path) -> Path:
    shutil.copytree(base, tmp_path / "s.zarr")
    return tmp_path / "s.zarr"


def add_copy(path: Path) -> LatentStore:
    """Add "feat" (a copy of the latents' codes), write every shard, finalize."""
    store = add_array(path, copy_declaration(open_store(path).spec))
    fill_added(AddedArrayWriter(store, "feat"))
    finalize_store(store)
    return open_store(path)


def _attrs(path: Path) -> dict:
    return dict(zarr.open_group(str(path)).attrs["latentdit"])


def test_an_added_array_is_read_verified_and_summarized(store):
    before = _attrs(store)
    added = add_array(store, copy_declaration(open_store(store).spec))
    assert added.spec.names == ("latents", "feat") and added.spec.array("feat").added
    seal, old = _attrs(store)["provenance"], before["provenance"]
    assert {k: seal["fields"][k] for k in old["fields"]} == old["fields"]  # extended, not redone
    assert "added_arrays" in seal["fields"] and seal["previous"] == [old["digest"]]
    with pytest.raises(StoreIncompleteError, match="array 'feat' is not written for 3 of 3"):
        load_latents(store, names=["feat"])
    assert len(load_latents(store)) == 39  # the latents read on as before
    failed = {c.name: c.message for c in validate_store(store) if not c.ok}
    assert "array 'feat' is not written for shards 0-2" in failed["checksums"]
    fill_added(AddedArrayWriter(added, "feat"))
    finalize_store(added)
    loaded = load_latents(store, names=["latents", "feat"])
    assert np.array_equal(loaded["feat"], loaded["latents"])
    assert all(c.ok for c in validate_store(store)), [c for c in validate_store(store) if not c.ok]
    reopened = open_store(store)
    assert np.array_equal(position_stats(reopened, "feat"), position_stats(reopened, "latents"))
    summary = reopened.summary
    assert summary["arrays"]["feat"]["channel_mean"] == summary["channel_mean"]


def test_adding_to_a_v1_store_leaves_its_metadata_and_data_as_they_were(tmp_path):
    with zipfile.ZipFile(ASSETS / "v1_stores.zip") as z:
        z.extractall(tmp_path)
    path = tmp_path / "v1_moments.zarr"
    before, latents = _attrs(path), (path / "latents/c/1/0/0/0/0").read_bytes()
    add_copy(path)
    after = _attrs(path)
    for key in set(before) - {"provenance", "summary"}:
        assert after[key] == before[key], key
    assert {k: after["summary"][k] for k in before["summary"]} == before["summary"]
    assert set(after) - set(before) == {"added_arrays"} and after["format_version"] == 1
    assert (path / "latents/c/1/0/0/0/0").read_bytes() == latents
    assert all(c.ok for c in validate_store(path))
    loaded = load_latents(path, names=["latents", "logstd", "feat"])
    assert np.array_equal(loaded["feat"], loaded["latents"]) and len(loaded) == 20


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda a: a["added_arrays"][0]["quant"]["scale"].__setitem__(0, 1.0), "added_arrays"),
        (lambda a: a.pop("added_arrays"), "added_arrays"),
        (lambda a: a.update(image_size=512), "image_size"),
        (lambda a: a["arrays"][0].update(description="edited"), "arrays"),
    ],
)
def test_the_extended_seal_still_shows_edits(store, edit, field):
    add_copy(store)
    group = zarr.open_group(str(store), mode="r+")
    attrs = dict(group.attrs["latentdit"])
    edit(attrs)
    group.attrs["latentdit"] = attrs
    with pytest.raises(StoreCorruptError, match=f"sealed at encoding: {field}"):
        verify_store(open_store(store))


def test_what_add_array_refuses_leaves_the_store_as_it_was(store, tmp_path):
    add_copy(store)
    before = _attrs(store)
    assert add_array(store, copy_declaration(open_store(store).spec)).spec.names[-1] == "feat"
    assert _attrs(store) == before  # the same declaration again: nothing to do
    other = copy_declaration(open_store(store).spec, "feat")
    other = type(other)(name="feat", shape=(2,), dtype="float16")
    with pytest.raises(SchemaMismatchError, match="has an array 'feat' already"):
        add_array(store, other)
    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(store, incomplete)
    zarr.open_group(str(incomplete), mode="r+")["shard_records"][2] = ""
    before = _attrs(incomplete)
    with pytest.raises(StoreIncompleteError, match=r"1 of 3 shards are not complete \(shards 2\)"):
        add_array(incomplete, copy_declaration(open_store(incomplete).spec, "more"))
    assert _attrs(incomplete) == before and not (incomplete / "more").exists()
    legacy = write_store(tmp_path / "legacy.zarr", n=40, legacy=True)
    with pytest.raises(StoreCorruptError, match="--seal"):
        add_array(legacy, copy_declaration(open_store(legacy).spec))
    assert not (legacy / "feat").exists()


def _same_added(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a)), zarr.open_group(str(b))
    for name in ("feat", "feat_stats", "feat_records", "latents", "shard_records"):
        np.testing.assert_array_equal(ga[name][:], gb[name][:])
    assert ga.attrs.asdict() == gb.attrs.asdict()


def test_kill_between_shards_then_resume_equals_uninterrupted(store, tmp_path, python):
    reference = tmp_path / "ref.zarr"
    shutil.copytree(store, reference)
    subprocess.run([python, JOB, str(reference)], check=True, timeout=120)
    proc = subprocess.Popen(
        [python, JOB, str(store), "--pause-at", "1"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "DATA 1"  # shard 1's rows are on disk, its record not
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    records = open_store(store).records("feat")
    assert [r is not None for r in records] == [True, False, False]
    leftover = store / "feat/c/1/0/0/0/0"
    leftover.write_bytes(leftover.read_bytes()[:100])  # torn, as a power cut would leave it
    subprocess.run([python, JOB, str(store)], check=True, timeout=120)
    _same_added(reference, store)
    assert all(c.ok for c in validate_store(store))


def _flip(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_added_shard_is_refused_then_rewritten(store):
    add_copy(store)
    _flip(store / "feat/c/1/0/0/0/0")
    with pytest.raises(StoreCorruptError, match="shard 1: checksum mismatch in feat"):
        load_latents(store, names=["feat"])
    assert len(load_latents(store)) == 39  # readers of the latents never read it
    failed = {c.name: c.message for c in validate_store(store) if not c.ok}
    assert "shard 1: checksum mismatch in feat" in failed["checksums"]
    writer = AddedArrayWriter(open_store(store), "feat")
    assert writer.todo == [1]
    fill_added(writer)
    finalize_store(open_store(store))
    assert all(c.ok for c in validate_store(store))


def test_rows_added_before_their_shard_was_rewritten_are_refused(store):
    add_copy(store)
    spec, failures = open_store(store).spec, open_store(store).records()[0].failures
    zarr.open_group(str(store), mode="r+")["shard_records"][0] = ""  # re-encode shard 0 anew
    writer = StoreWriter(open_store(store), [0])
    codes, _ = quantize(random_latents(16, variants=2, seed=7), spec.quant)
    labels = (np.arange(16) % 3).astype(np.int16)
    labels[5] = -1
    writer.write_shard(0, {"latents": codes.numpy()}, labels, failures=failures)
    finalize_store(open_store(store))
    with pytest.raises(StoreCorruptError, match="shard 0: array 'feat' was written for another"):
        load_latents(store, names=["feat"])
    assert AddedArrayWriter(open_store(store), "feat").todo == [0]


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_batches_carry_the_added_array_of_each_sample_and_variant(store, mode):
    add_copy(store)
    opened = open_store(store)
    norm = normalization_from_store(opened, "channel_stats")
    layout = BatchLayout(batch_size=8, grad_accum=2, rank=0, world_size=1)
    kw = dict(mode=mode, seed=3, device=CPU, shuffle_shards=2)
    plain = build_batches(opened, norm, layout, **kw)
    named = build_batches(opened, norm, layout, arrays=["feat"], **kw)
    for epoch, step in ((0, 0), (0, 1), (1, 0)):
        for a, b in zip(plain.get(epoch, step), named.get(epoch, step), strict=True):
            assert a.keys() == {"latents", "labels"} and b.keys() == {"latents", "labels", "feat"}
            assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["labels"], b["labels"])
            assert b["feat"].dtype == torch.float32 and b["feat"].shape == (4, 4, 8, 8)
            torch.testing.assert_close(norm.denormalize(b["latents"]), b["feat"])  # its own row


def test_records_of_an_added_array_are_json_with_their_base(store):
    add_copy(store)
    raw = json.loads(str(zarr.open_group(str(store))["feat_records"][2]))
    assert raw["base"] == open_store(store).records()[2].digest() and set(raw["arrays"]) == {"feat"}
