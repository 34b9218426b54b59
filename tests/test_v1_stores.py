"""Stores written by latentdit before arrays were declared (format v1) keep working unchanged.

The assets (tests/assets/make_v1_stores.py made them with main at 6cf4fec): v1_stores.zip holds
two sealed stores (posterior mean, and moments with `logstd`; both with flips, 3 shards, one
failed image); v1_reference.npz the batches that code made; v1_reference.json a run's losses.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import TINY_DIT

from latent_store import StoreWriter, finalize_store, load_latents, open_store, validate_store
from trainer.config import resolve_config
from trainer.data import BatchLayout, build_batches
from trainer.normalization import normalization_from_store
from trainer.train import train

ASSETS = Path(__file__).parent / "assets"
STORES = ("v1_mean.zarr", "v1_moments.zarr")


def tree_digest(folder: Path) -> str:
    """A digest of every file of a folder, names and bytes: equal iff nothing was written."""
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """The v1 stores unpacked into a fresh folder."""
    with zipfile.ZipFile(ASSETS / "v1_stores.zip") as z:
        z.extractall(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", STORES)
def test_v1_stores_validate_and_load_without_a_write(v1, name):
    before = tree_digest(v1 / name)
    checks = validate_store(v1 / name)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    arrays = load_latents(v1 / name)
    assert arrays.latents.shape == (20, 2, 4, 4, 4) and len(arrays.labels) == 20
    assert tree_digest(v1 / name) == before


def test_v1_batches_are_the_ones_main_made(v1):
    reference = np.load(ASSETS / "v1_reference.npz")
    store = open_store(v1 / "v1_mean.zarr")
    norm = normalization_from_store(store, "channel_stats")
    layout = BatchLayout(batch_size=4, grad_accum=1, rank=0, world_size=1)
    for mode in ("memory", "stream"):
        source = build_batches(
            store, norm, layout, mode=mode, seed=0, device=torch.device("cpu"), shuffle_shards=2
        )
        for key in (k for k in reference.files if k.startswith(mode) and k.endswith("_x")):
            epoch, step = (int(part[1:]) for part in key.split("_")[1:3])
            (batch,) = source.get(epoch, step)  # the named batch holds main's (x, y)
            assert batch.keys() == {"latents", "labels"}
            assert torch.equal(batch["latents"], torch.from_numpy(reference[key])), key
            assert torch.equal(batch["labels"], torch.from_numpy(reference[key[:-1] + "y"])), key


def test_v1_store_trains_and_resumes_as_main_did(v1, tmp_path):
    reference = json.loads((ASSETS / "v1_reference.json").read_text())
    store = v1 / "v1_mean.zarr"
    before = tree_digest(store)
    options = {"store": str(store), "run": str(tmp_path / "run"), **TINY_DIT}
    options.update(batch_size=reference["batch_size"], warmup_steps=0, log_every=1)
    options.update(ckpt_every=reference["resume_at"], device="cpu")
    train(resolve_config(None, {**options, "steps": reference["resume_at"]}))
    train(resolve_config(None, {**options, "steps": reference["steps"]}))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [r["step"] for r in reference["log"]]
    for mine, theirs in zip(log, reference["log"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5), mine["step"]
    assert tree_digest(store) == before


def test_rewriting_a_v1_shard_writes_what_main_wrote(v1):
    """A v1 store's shard lost in a crash and written again by today's writer (as a resumed
    encode does) gets main's bytes: data, v1 record (one checksum, per-channel sums), summary."""
    path = v1 / "v1_moments.zarr"
    original = {f: f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
    store = open_store(path)
    record, data = store.records()[1], store.read_shard(1)  # holds a failed image
    zarr.open_group(str(path), mode="r+")["shard_records"][1] = ""
    writer = StoreWriter(store, [1])  # discards the shard's leftovers, as a resumed encode does
    assert writer.todo == [1] and not (path / "latents/c/1/0/0/0/0").exists()
    arrays = {n: data[n] for n in ("latents", "logstd")}
    clipped = {"latents": record.clipped}
    kw = dict(failures=record.failures, image_modes=record.image_modes, clipped=clipped)
    writer.write_shard(1, arrays, data["labels"], **kw)
    finalize_store(store)
    now = {f: f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
    assert now.keys() == original.keys()
    assert [f.relative_to(path) for f in now if now[f] != original[f]] == []
