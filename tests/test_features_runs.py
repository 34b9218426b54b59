"""Encode --features in real processes: killed and resumed (made with the latents, and added to a
finished store), and two ranks under torchrun, each giving the store an uninterrupted run gives."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import BOMB_MAX_PIXELS, ROOT, store_contents
from test_pipeline import SUBPROCESS_ENV, torchrun_cli
from test_pipeline import _equal as _same

from latent_store import LatentStore, validate_store
from pipeline.encode import EncodeConfig, encode
from testkit.vision_encoders import make_tiny_vision_encoder

SIZE = 32
ARGS = ["--image-size", str(SIZE), "--shard-size", "4", "--chunk-size", "2", "--flip"]
ARGS += ["--calibration-samples", "64", "--max-failures", "6", "--max-pixels", str(BOMB_MAX_PIXELS)]
ARGS += ["--device", "cpu"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return make_tiny_vision_encoder(tmp_path_factory.mktemp("enc") / "reg", "dinov2_with_registers")


def job(tree: Path, out: Path, vae: Path, **kw) -> EncodeConfig:
    options = dict(image_size=SIZE, shard_size=4, chunk_size=2, flip=True, calibration_samples=64)
    options |= dict(workers=0, max_failures=6, max_pixels=BOMB_MAX_PIXELS, device="cpu")
    return EncodeConfig(source=tree, out=str(out), vae=str(vae), **{**options, **kw})


def _complete(out: Path, name: str | None) -> int:
    """Shards complete so far (of the latents, or of the added array `name`); 0 before."""
    try:
        store = LatentStore(out)
        return sum(r is not None for r in store.records(name))
    except Exception:  # not created (or declared) yet, or being written
        return 0


def _kill_midway(args: list[str], done: Callable[[], int], total: int) -> None:
    """Run `latentdit ARGS`, SIGKILL it once `done()` shards are written but not all."""
    cmd = [sys.executable, str(ROOT / "cli.py"), *args, "--workers", "1", "--batch-size", "1"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None and not done():
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 0 < done() < total, f"killed at {done()} of {total} shards: too early or too late"


def test_killed_encode_with_features_resumes_to_the_same_store(
    image_tree, tiny_vae_dir, encoder, tmp_path
):
    out, whole = tmp_path / "killed.zarr", tmp_path / "whole.zarr"
    args = ["encode", str(image_tree), "--out", str(out), "--vae", str(tiny_vae_dir), *ARGS]
    _kill_midway([*args, "--features", str(encoder)], lambda: _complete(out, None), 6)
    encode(job(image_tree, out, tiny_vae_dir, features=str(encoder), batch_size=1))
    encode(job(image_tree, whole, tiny_vae_dir, features=str(encoder), batch_size=1))
    _same(store_contents(out), store_contents(whole))


def test_killed_feature_adding_resumes_and_leaves_the_latents(
    image_tree, tiny_vae_dir, encoder, tmp_path
):
    out, whole = tmp_path / "killed.zarr", tmp_path / "whole.zarr"
    encode(job(image_tree, out, tiny_vae_dir, batch_size=1))
    shutil.copytree(out, whole)
    latents = store_contents(out)["latents"]
    args = ["encode", str(image_tree), "--out", str(out), "--vae", str(tiny_vae_dir), *ARGS]
    _kill_midway([*args, "--features", str(encoder)], lambda: _complete(out, "features"), 6)
    assert not all(c.ok for c in validate_store(out))  # features not written everywhere yet
    encode(job(image_tree, out, tiny_vae_dir, features=str(encoder), batch_size=1))
    encode(job(image_tree, whole, tiny_vae_dir, features=str(encoder), batch_size=1))
    _same(store_contents(out), store_contents(whole))
    assert np.array_equal(store_contents(out)["latents"], latents)
    assert all(c.ok for c in validate_store(out))


@pytest.mark.parametrize("added", [False, True], ids=["with-latents", "added"])
def test_two_ranks_under_torchrun_match_one(image_tree, tiny_vae_dir, encoder, tmp_path, added):
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    if added:  # the latents first, by one process; the features by two ranks
        encode(job(image_tree, two, tiny_vae_dir))
    encode(job(image_tree, one, tiny_vae_dir, **({} if added else {"features": str(encoder)})))
    if added:
        encode(job(image_tree, one, tiny_vae_dir, features=str(encoder)))
    args = ["encode", str(image_tree), "--out", str(two), "--vae", str(tiny_vae_dir), *ARGS]
    torchrun_cli(*args, "--features", str(encoder), "--workers", "0")
    _same(store_contents(two), store_contents(one))
