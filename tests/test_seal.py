"""Stores written before seals existed: readers refuse them naming the fix, `validate --seal`
seals them only when every check passes, and their blake2b-128 shard records keep verifying
next to the xxh3-128 records new stores get."""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from conftest import TINY_DIT, write_store
from test_verify import CORRUPTIONS, _edit_record, _flip
from typer.testing import CliRunner

from cli import app
from latent_store import LatentStore, StoreCorruptError, load_latents, validate_store
from latent_store.checksums import shard_checksum

TRAIN = [a for k, v in TINY_DIT.items() for a in (f"--{k.replace('_', '-')}", str(v))]
TRAIN += ["--batch-size", "8", "--warmup-steps", "0", "--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> Path:
    """40 samples in 3 shards (sample 5 failed), as a latentdit before seals wrote them."""
    return write_store(tmp_path_factory.mktemp("old") / "s.zarr", n=40, failures=(5,), legacy=True)


@pytest.fixture
def old(legacy, tmp_path) -> Path:
    shutil.copytree(legacy, tmp_path / "old.zarr")
    return tmp_path / "old.zarr"


def invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def refused(result, match: str) -> str:
    """The one `error:` line of a refused command."""
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and match in result.output, result.output
    return result.output


def files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*") if p.is_file()}


def test_old_records_are_the_old_blake2b_checksums(legacy):
    """Independent of our code: blake2b-128 over the latents' then the labels' bytes."""
    store = LatentStore(legacy)
    record, data = store.records()[1], store.read_shard(1)
    h = hashlib.blake2b(data["latents"].tobytes() + data["labels"].tobytes(), digest_size=16)
    assert record.checksum == f"blake2b-128:{h.hexdigest()}"
    assert "provenance" not in store.attrs
    new = LatentStore(write_store(legacy.parent / "new.zarr"))
    assert new.records()[0].checksum.startswith("xxh3-128:")


def test_an_old_store_is_refused_then_sealed_then_loads(old, tmp_path):
    fix = f"latentdit validate {old} --seal"
    refused(invoke("train", "--store", old, "--run", tmp_path / "r0", *TRAIN), fix)
    refused(invoke("inspect", old), fix)
    with pytest.raises(StoreCorruptError, match=r"no sealed provenance.*--seal"):
        load_latents(old)
    report = invoke("validate", old)
    assert report.exit_code == 1 and "FAIL provenance: no sealed provenance" in report.output
    assert fix in report.output

    sealed = invoke("validate", old, "--seal")
    assert sealed.exit_code == 0, sealed.output
    assert "PASS provenance: sealed now" in sealed.output and f"{old}: valid" in sealed.output
    assert all(c.ok for c in validate_store(old))
    new = write_store(tmp_path / "new.zarr", n=40, failures=(5,))  # the same samples, sealed
    a, b = load_latents(old), load_latents(new)
    assert np.array_equal(a.latents, b.latents) and np.array_equal(a.labels, b.labels)
    assert invoke("train", "--store", old, "--run", tmp_path / "r1", *TRAIN).exit_code == 0
    again = invoke("validate", old, "--seal")  # sealed already and intact: nothing to write
    assert again.exit_code == 0 and "PASS provenance: metadata matches its seal" in again.output


def test_an_old_store_loads_unchanged_without_verify(old):
    assert len(load_latents(old, verify=False)) == 39


def test_a_sealed_store_of_blake2b_records_validates_and_loads(tmp_path):
    """Stores written this morning (seals, blake2b-128 records) need nothing: no --seal."""
    old = partial(shard_checksum, algorithm="blake2b-128")
    with mock.patch("latent_store.writer.shard_checksum", old):
        store = write_store(tmp_path / "s.zarr", n=40, failures=(5,))
    assert LatentStore(store).records()[2].checksum.startswith("blake2b-128:")
    assert all(c.ok for c in validate_store(store))
    new = load_latents(write_store(tmp_path / "new.zarr", n=40, failures=(5,)))
    assert np.array_equal(load_latents(store).latents, new.latents)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda s: _flip(s / "latents/c/1/0/0/0/0", 100), "(checksums), first: shard 1: checksum"),
        (lambda s: (s / "labels/c/2").unlink(), "shard 2: data file missing (labels/c/2)"),
        (lambda s: (s / "shard_records/c/0").unlink(), "(completion), first: no completion"),
        (CORRUPTIONS["summary edited"][0], "(summary)"),
        (CORRUPTIONS["key emptied"][0], "(keys)"),
    ],
)
def test_a_damaged_old_store_is_not_sealed(old, damage, match):
    damage(old)
    before = files(old)
    refused(invoke("validate", old, "--seal"), match)
    assert files(old) == before


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (CORRUPTIONS["quantization scale edited"][0], "not resealed: it is sealed already and "),
        (CORRUPTIONS["seal removed"][0], "xxh3-128) were written by a latentdit that seals"),
    ],
)
def test_a_store_sealed_at_encoding_is_not_resealed(tmp_path, edit, match):
    store = write_store(tmp_path / "s.zarr", n=40)
    edit(store)
    before = files(store)
    refused(invoke("validate", store, "--seal"), match)
    assert files(store) == before


def test_sealed_old_shards_are_still_verified(old):
    assert invoke("validate", old, "--seal").exit_code == 0
    _flip(old / "latents/c/2/0/0/0/0", 100)
    with pytest.raises(StoreCorruptError, match=r"shard 2: checksum mismatch \(recorded blake2b"):
        load_latents(old)


def test_a_checksum_of_unknown_kind_is_refused(tmp_path):
    store = write_store(tmp_path / "s.zarr", n=40)
    _edit_record(store, 1, checksum="md5:" + "0" * 32)
    with pytest.raises(StoreCorruptError, match="shard 1: a checksum of unknown kind 'md5'"):
        load_latents(store)
    failed = [c.message for c in validate_store(store) if not c.ok]
    assert failed == ["shard 1: a checksum of unknown kind 'md5' (known: xxh3-128 or blake2b-128)"]
    assert json.loads(invoke("validate", store, "--json").output)["ok"] is False
