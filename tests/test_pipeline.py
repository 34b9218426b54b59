"""Stage 1: sources, preprocessing, the encode job (bad files, resume, torchrun) and its CLI."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    BOMB_MAX_PIXELS,
    BROKEN,
    ROOT,
    WNIDS,
    make_image_tree,
    make_tiny_vae,
    smooth_image,
    store_contents,
)
from PIL import Image
from typer.testing import CliRunner

from cli import app
from latent_store import LatentStore, SchemaMismatchError, validate_store
from pipeline.encode import EncodeConfig, TooManyFailuresError, encode
from pipeline.preprocess import (
    PreprocessConfig,
    center_crop_adm,
    decode_image,
    preprocess,
    to_rgb,
)

SIZE = 32  # crop side: 4x4 latents from the tiny 8x-downsampling VAE
# many shards and chunks for 22 images; batch composition is part of what makes runs identical
JOB = dict(image_size=SIZE, shard_size=4, chunk_size=2, batch_size=2, calibration_samples=16)
JOB_ARGS = ["--image-size", "32", "--shard-size", "4", "--chunk-size", "2", "--batch-size", "2"]
JOB_ARGS += ["--calibration-samples", "16", "--max-failures", "6", "--max-pixels", "500000"]


# One intra-op thread: on a busy 2-core machine two OpenMP threads make tiny convolutions ~50x
# slower, and the subprocesses below get the same setting so that every run computes alike.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def job(tree: Path, out: Path, vae: Path, **kw) -> EncodeConfig:
    base = dict(JOB, workers=0, max_failures=6, max_pixels=BOMB_MAX_PIXELS, device="cpu")
    return EncodeConfig(source=tree, out=out, vae=str(vae), **{**base, **kw})


@pytest.fixture(scope="module")
def reference(image_tree, tiny_vae_dir, tmp_path_factory) -> Path:
    """The tree encoded once, uninterrupted, in this process."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    encode(job(image_tree, out, tiny_vae_dir))
    return out


# --- preprocessing ------------------------------------------------------------------------------


def reference_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr, restated from the paper code's description."""
    width, height = img.size
    while width >= 2 * size and height >= 2 * size:
        width, height = width // 2, height // 2
        img = img.resize((width, height), Image.BOX)
    ratio = size / min(width, height)
    width, height = round(width * ratio), round(height * ratio)
    img = img.resize((width, height), Image.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return np.array(img.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("size", [32, 64])
def test_adm_crop_is_bit_exact(size):
    shapes = [(size, size), (size + 1, size), (size, 3 * size + 1), (2 * size, 2 * size)]
    shapes += [(2 * size - 1, 5 * size), (4 * size + 3, 2 * size + 1), (9 * size + 5, 3 * size)]
    shapes += [(17, 9), (size * 8 + 7, size * 5 + 3), (3 * size, 2 * size - 1)]
    for seed, (w, h) in enumerate(shapes):
        img = smooth_image(w, h, seed)
        got = center_crop_adm(img, size)
        assert got.dtype == np.uint8 and got.shape == (size, size, 3)
        assert np.array_equal(got, reference_center_crop(img, size)), (w, h)


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_every_mode_becomes_rgb_on_purpose():
    deep = Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16))
    gray = np.asarray(to_rgb(decode_image(_png(deep))))
    assert gray[0, :, 0].tolist() == [0, 1, 128, 255]  # scaled, not clipped at 255
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))  # fully transparent: the white background shows
    assert np.asarray(to_rgb(decode_image(_png(rgba)))).tolist() == [
        [[10, 20, 30], [255, 255, 255]]
    ]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 100, 50])
    palette.putpixel((1, 0), 1)
    out = to_rgb(decode_image(_png(palette, transparency=0)))
    assert np.asarray(out).tolist() == [[[255, 255, 255], [200, 100, 50]]]
    for mode in ("CMYK", "L", "LA", "1", "I", "F"):
        img = smooth_image(8, 8, 0).convert(mode)
        assert to_rgb(img).mode == "RGB", mode


def test_exif_orientation_is_ignored_unless_asked():
    img = smooth_image(48, 32, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif)
    plain, mode = preprocess(buf.getvalue(), PreprocessConfig(image_size=16))
    turned, _ = preprocess(buf.getvalue(), PreprocessConfig(image_size=16, exif_transpose=True))
    decoded = decode_image(buf.getvalue())
    assert mode == "RGB" and np.array_equal(plain, center_crop_adm(decoded, 16))
    assert np.array_equal(
        turned, center_crop_adm(decoded.transpose(Image.Transpose.ROTATE_270), 16)
    )


# --- the encode job -----------------------------------------------------------------------------


def test_every_file_is_encoded_skipped_or_ignored(reference, tmp_path):
    store = LatentStore(reference)
    expected_modes = make_image_tree(tmp_path / "again")  # the same generator: its modes
    keys = store.array("keys")[:].tolist()
    assert sorted(keys) == sorted([*expected_modes, *BROKEN])
    records = [r for r in store.records() if r is not None]
    failures = {f.key: f.reason for r in records for f in r.failures}
    assert set(failures) == set(BROKEN)
    for key, prefix in BROKEN.items():
        assert failures[key].startswith(prefix), failures[key]
    modes = sum((Counter(r.image_modes) for r in records), Counter())
    assert modes == Counter(expected_modes.values())
    labels = store.array("labels")[:]
    for i, key in enumerate(keys):
        want = -1 if key in BROKEN else WNIDS.index(key.split("/")[0])
        assert labels[i] == want, key
    checks = validate_store(reference)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert store.spec.vae.scaling_factor == 0.5  # read from the tiny VAE's config
    assert store.spec.latent_shape == (4, SIZE // 8, SIZE // 8)


def test_sixteen_channel_vae_with_shift_factor(image_tree, tmp_path):
    """SD3/FLUX-style VAEs: 16 latent channels and a shift_factor, both read from the config."""
    from diffusers import AutoencoderKL

    folder = make_tiny_vae(tmp_path / "vae16", latent_channels=16)
    vae = AutoencoderKL.from_pretrained(folder)
    vae.register_to_config(shift_factor=0.125)
    vae.save_pretrained(folder)
    out = tmp_path / "s16.zarr"
    encode(job(image_tree, out, folder, calibration_samples=64))  # all 22: 4x4 latents are few
    spec = LatentStore(out).spec
    assert spec.latent_shape == (16, SIZE // 8, SIZE // 8)
    assert (spec.vae.shift_factor, spec.vae.latent_channels) == (0.125, 16)
    assert all(c.ok for c in validate_store(out))


def test_flip_and_moments(image_tree, tiny_vae_dir, tmp_path):
    out = tmp_path / "flip.zarr"
    encode(job(image_tree, out, tiny_vae_dir, flip=True, posterior="moments"))
    store = LatentStore(out)
    assert store.spec.variants == ("image", "hflip") and store.spec.logstd_quant is not None
    latents = store.array("latents")[:]
    assert store.array("logstd").shape == latents.shape
    ok = store.array("labels")[:] >= 0
    assert not np.array_equal(latents[ok, 0], latents[ok, 1])  # a flipped image's own latent
    assert all(c.ok for c in validate_store(out))


def test_sample_posterior_is_seeded_per_key(image_tree, tiny_vae_dir, tmp_path, reference):
    first, second = tmp_path / "a.zarr", tmp_path / "b.zarr"
    encode(job(image_tree, first, tiny_vae_dir, posterior="sample"))
    encode(job(image_tree, second, tiny_vae_dir, posterior="sample", batch_size=4, shard_size=8))
    a, b = store_contents(first), store_contents(reference)
    assert not np.array_equal(a["latents"], b["latents"])  # a sample, not the mean
    # same per-key noise whatever the batching; only float rounding may move a code by one
    diff = np.abs(a["latents"].astype(int) - store_contents(second)["latents"].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_compiled_encoder_matches_eager(image_tree, tiny_vae_dir, tmp_path, reference):
    """--compile (the whole encode graph, one static batch shape) writes the eager store up to
    float rounding; a second run with the same --compile-cache loads what the first compiled."""
    from torch._dynamo.utils import counters

    cache = tmp_path / "compile-cache"
    out = tmp_path / "compiled.zarr"
    encode(job(image_tree, out, tiny_vae_dir, compile=True, compile_cache=cache))
    a, b = store_contents(out), store_contents(reference)
    assert np.array_equal(a["labels"], b["labels"])
    diff = np.abs(a["latents"].astype(int) - b["latents"].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.9
    assert all(c.ok for c in validate_store(out))
    assert (cache / "artifacts.bin").stat().st_size > 0 and (cache / "inductor").is_dir()
    torch._dynamo.reset()  # forget the in-process compilation: only the cache folder is left
    counters.clear()
    again = tmp_path / "again.zarr"
    encode(job(image_tree, again, tiny_vae_dir, compile=True, compile_cache=cache))
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
    assert _equal(store_contents(again), a)


def test_encode_to_an_fsspec_url(reference, image_tree, tiny_vae_dir):
    url = "memory://encode-test/store.zarr"  # fsspec's in-process file system
    encode(job(image_tree, url, tiny_vae_dir))
    assert all(c.ok for c in validate_store(url))
    assert _equal(store_contents(url), store_contents(reference))


def test_too_many_failures_stop_the_run(image_tree, tiny_vae_dir, tmp_path):
    with pytest.raises(TooManyFailuresError, match=r"more than --max-failures 2"):
        encode(job(image_tree, tmp_path / "s.zarr", tiny_vae_dir, max_failures=2))
    with pytest.raises(TooManyFailuresError, match=r"--max-failures 0\.1"):
        encode(job(image_tree, tmp_path / "s.zarr", tiny_vae_dir, max_failures=0.1))


def test_default_max_failures_rule(image_tree, tiny_vae_dir, tmp_path):
    """max(10, 1%), never more than 10%: 2 bad files of 135 pass, 4 of 22 (18%) stop the run."""
    rule = EncodeConfig(source=tmp_path, out=tmp_path / "x")
    assert [rule.failure_limit(n) for n in (22, 135, 1000, 1_281_167)] == [2, 10, 10, 12811]
    with pytest.raises(TooManyFailuresError, match=r"default: max\(10, 1% of the images\)"):
        encode(job(image_tree, tmp_path / "s.zarr", tiny_vae_dir, max_failures=None))


def test_rerunning_encode_repairs_damaged_shards(reference, image_tree, tiny_vae_dir, tmp_path):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(reference, damaged)
    shard = damaged / "latents" / "c" / "1" / "0" / "0" / "0" / "0"
    shard.write_bytes(bytes(len(shard.read_bytes())))  # zeros: the checksum no longer matches
    assert not all(c.ok for c in validate_store(damaged))
    encode(job(image_tree, damaged, tiny_vae_dir))  # the same command re-encodes shard 1 only
    assert all(c.ok for c in validate_store(damaged))
    assert _equal(store_contents(damaged), store_contents(reference))


def test_mismatched_resume_is_refused(reference, image_tree, tiny_vae_dir, tmp_path):
    before = store_contents(reference)
    with pytest.raises(SchemaMismatchError, match=r"variants: \('image',\) \(store\)"):
        encode(job(image_tree, reference, tiny_vae_dir, flip=True))
    with pytest.raises(SchemaMismatchError, match=r"image_size: 32 \(store\) vs 64 \(now\)"):
        encode(job(image_tree, reference, tiny_vae_dir, image_size=64))
    other = tmp_path / "train"
    shutil.copytree(image_tree, other)
    (other / WNIDS[0] / "extra.JPEG").write_bytes((other / WNIDS[0] / "gray.JPEG").read_bytes())
    with pytest.raises(SchemaMismatchError, match="source"):
        encode(job(other, reference, tiny_vae_dir))
    assert _equal(store_contents(reference), before)


def _equal(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    for name in a:
        same = a[name] == b[name] if name == "attrs" else np.array_equal(a[name], b[name])
        assert same, f"{name} differs"
    return True


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *args]


def test_resume_after_sigkill_is_identical(reference, image_tree, tiny_vae_dir, tmp_path):
    out = tmp_path / "killed.zarr"
    args = ["encode", str(image_tree), "--out", str(out), "--vae", str(tiny_vae_dir)]
    proc = subprocess.Popen(
        _cli(*args, *JOB_ARGS, "--workers", "1", "--device", "cpu", "--batch-size", "1"),
        cwd=ROOT,
        env=SUBPROCESS_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        complete = _wait_for_some_shards(out, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 0 < complete < LatentStore(out).spec.num_shards, "killed too late to test a resume"
    assert LatentStore(out).missing_shards()
    encode(job(image_tree, out, tiny_vae_dir, batch_size=1))  # the same job, resumed
    resumed = store_contents(out)
    encode(job(image_tree, tmp_path / "whole.zarr", tiny_vae_dir, batch_size=1))
    assert _equal(resumed, store_contents(tmp_path / "whole.zarr"))


def _wait_for_some_shards(out: Path, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            complete = LatentStore(out).spec.num_shards - len(LatentStore(out).missing_shards())
        except Exception:  # not created yet, or being created
            complete = 0
        if complete:
            return complete
        time.sleep(0.01)
    raise AssertionError(f"no shard completed (exit code {proc.poll()})")


def torchrun_cli(*args: str, ranks: int = 2) -> None:
    """`latentdit ARGS` under torchrun with `ranks` CPU processes; asserts it succeeds."""
    run = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
    ]
    done = subprocess.run(
        [*run, str(ROOT / "cli.py"), *args],
        cwd=ROOT,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_ranks_under_torchrun_match_one(reference, image_tree, tiny_vae_dir, tmp_path):
    out = tmp_path / "ranks.zarr"
    args = ["encode", str(image_tree), "--out", str(out), "--vae", str(tiny_vae_dir)]
    torchrun_cli(*args, *JOB_ARGS, "--workers", "0", "--device", "cpu")
    assert _equal(store_contents(out), store_contents(reference))


# --- the command line ---------------------------------------------------------------------------


def _invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def test_cli_encode_and_bad_input(image_tree, tiny_vae_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "cli.zarr"
    base = ["encode", str(image_tree), "--vae", str(tiny_vae_dir), "--workers", "0"]
    ok = _invoke(*base, "--out", str(out), *JOB_ARGS, "--device", "cpu")
    assert ok.exit_code == 0, ok.output
    assert "18 samples written, 4 failed" in ok.output
    empty = tmp_path / "empty"
    (empty / "n00000001").mkdir(parents=True)
    (empty / "n00000001" / "README.txt").write_text("no images here")
    not_a_vae = tmp_path / "not_a_vae"
    not_a_vae.mkdir()
    bad = {
        "does not exist": ["encode", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        "no images found": ["encode", str(empty), "--out", str(tmp_path / "o")],
        "cannot load VAE": [*base, "--out", str(tmp_path / "o"), "--vae", str(not_a_vae)],
        "no such folder": [*base, "--out", str(tmp_path / "o"), "--vae", "./no/such/vae"],
        "HF_HUB_OFFLINE is set": [*base, "--out", str(tmp_path / "o"), "--vae", "no-org/no-vae"],
        "fp8": [*base, "--out", str(tmp_path / "o"), "--dtype", "fp8"],
        "max-failures": [*base, "--out", str(tmp_path / "o"), "--max-failures", "many"],
    }
    if not torch.cuda.is_available():
        bad["no CUDA device"] = [*base, "--out", str(tmp_path / "o"), "--device", "cuda"]
    for message, args in bad.items():
        result = _invoke(*args)
        assert result.exit_code != 0, (message, result.output)
        assert message in result.output, (message, result.output)
        if result.exit_code == 2 and result.output.startswith("error:"):
            assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o").exists()


def test_validate_decode_check_reports_psnr(reference):
    # the tiny random VAE decodes at ~10 dB: below the default floor, above --min-psnr 0
    low = _invoke("validate", str(reference), "--decode-check", "5")
    assert low.exit_code == 1 and "below --min-psnr 20 dB" in low.output, low.output
    assert "INVALID" in low.output
    result = _invoke("validate", str(reference), "--decode-check", "5", "--min-psnr", "0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["decode_check"]["samples"] == 5
    decoded = report["decode_check"]
    assert math.isfinite(decoded["psnr_stored_db"]) and math.isfinite(decoded["psnr_float_db"])
    # stored latents sit within half a quantization step of the float ones (plus float noise)
    half_step = max(LatentStore(reference).spec.quant.scale) / 2
    assert 0 < decoded["latent_rmse"] <= half_step * 1.01
