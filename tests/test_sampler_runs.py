"""Sampling runs from real checkpoints: seeds, resume, solver checks, the training hook, the CLI."""

from __future__ import annotations

import dataclasses
import json
import zipfile

import numpy as np
import pytest
from conftest import make_checkpoint, make_tiny_vae, write_store
from test_sampler import (
    runner,
)

from cli import app
from sampler import outputs
from sampler.config import SampleConfig, SolveConfig
from sampler.errors import SamplerError
from sampler.sample import sample

# --- solvers on data x0 ~ N(MU, SIG^2) per dimension, whose exact predictions are closed form ------


# (solver, few steps, many steps, largest error at many steps)


# --- sampling runs from real checkpoints ---------------------------------------------------------


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, tiny_vae_dir):
    run = tmp_path_factory.mktemp("flow") / "run"
    make_checkpoint(run, tiny_vae_dir)
    return run


SOLVE_FIELDS = {f.name for f in dataclasses.fields(SolveConfig)}


def run_config(run, out, **kw) -> SampleConfig:
    """A SampleConfig with 3 guided steps; solver options (steps, cfg, sampler...) go to `solve`."""
    solve = {"steps": 3, "cfg": 2.0, **{k: v for k, v in kw.items() if k in SOLVE_FIELDS}}
    rest = {k: v for k, v in kw.items() if k not in SOLVE_FIELDS}
    return SampleConfig(checkpoint=run, out=out, solve=SolveConfig(**solve), **rest)


def pngs(out) -> dict[str, np.ndarray]:
    return {p.name: outputs.read_png(p) for p in sorted((out / "images").glob("*.png"))}


def test_same_seed_same_image_across_batch_sizes(flow_run, tmp_path):
    """Per-image generators: batch size and running an image alone do not change it (SDE solver)."""
    kw = {"classes": ("0", "2"), "n": 3, "sampler": "euler-maruyama"}
    sample(run_config(flow_run, tmp_path / "b1", batch_size=1, **kw))
    sample(run_config(flow_run, tmp_path / "b4", batch_size=4, **kw))
    one, four = pngs(tmp_path / "b1"), pngs(tmp_path / "b4")
    assert list(one) == [f"{i:06d}-n0000000{c}-seed0.png" for i, c in enumerate("000222")]
    assert list(one) == list(four)
    # batched matmuls may round differently per batch size (BLAS, GPUs): allow a rare 1-level step
    for name in one:
        diff = np.abs(one[name].astype(int) - four[name].astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99, name
    alone = tmp_path / "alone"
    sample(
        run_config(flow_run, alone, classes=("2",), n=1, first_index=4, sampler="euler-maruyama")
    )
    image = pngs(alone)["000004-n00000002-seed0.png"]
    assert np.abs(image.astype(int) - one["000004-n00000002-seed0.png"].astype(int)).max() <= 1
    assert len({im.tobytes() for im in one.values()}) == 6  # different images
    assert (tmp_path / "b1" / "grid.png").is_file()


def test_interrupted_npz_run_resumes_to_the_same_file(flow_run, tmp_path, monkeypatch):
    kw = {"classes": ("1",), "n": 7, "npz": True, "png": False}
    whole = sample(run_config(flow_run, tmp_path / "whole", batch_size=3, **kw))
    assert whole.made == 7 and whole.npz.name == "samples_7x32x32x3.npz"
    with np.load(whole.npz) as data:
        assert list(data) == ["arr_0"]
        assert data["arr_0"].shape == (7, 32, 32, 3) and data["arr_0"].dtype == np.uint8

    real_write_part, parts = outputs.write_part, []

    def crash_after_two(out, start, images):
        if len(parts) == 2:
            raise KeyboardInterrupt("killed")
        parts.append(start)
        real_write_part(out, start, images)

    monkeypatch.setattr(outputs, "write_part", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        sample(run_config(flow_run, tmp_path / "cut", batch_size=2, **kw))
    monkeypatch.setattr(outputs, "write_part", real_write_part)
    assert outputs.done_parts(tmp_path / "cut") == [(0, 2), (2, 4)]
    resumed = sample(run_config(flow_run, tmp_path / "cut", batch_size=5, **kw))
    assert resumed.made == 3
    assert resumed.npz.read_bytes() == whole.npz.read_bytes()
    assert not (tmp_path / "cut" / outputs.PARTS).exists()
    assert sample(run_config(flow_run, tmp_path / "cut", batch_size=5, **kw)).made == 0
    with pytest.raises(SamplerError, match=r"other settings.*steps 3 there vs 4 now"):
        sample(run_config(flow_run, tmp_path / "cut", **{**kw, "steps": 4}))
    with zipfile.ZipFile(resumed.npz) as zf:
        assert zf.namelist() == ["arr_0.npy"]


def test_ddpm_checkpoint_and_solver_checks(tmp_path, tiny_vae_dir):
    run = tmp_path / "ddpm"
    make_checkpoint(run, tiny_vae_dir, objective="ddpm")
    result = sample(run_config(run, tmp_path / "out", sampler="ddim", eta=0.5, n=2))
    assert result.made == 2 and len(pngs(tmp_path / "out")) == 2
    settings = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert settings["sampler"] == "ddim" and settings["eta"] == 0.5
    with pytest.raises(SamplerError, match=r"heun is for flow_matching models.*ddpm, ddim, dpm"):
        sample(run_config(run, tmp_path / "x", sampler="heun"))
    with pytest.raises(SamplerError, match="--shift applies to flow"):
        sample(run_config(run, tmp_path / "x", shift=3.0))
    with pytest.raises(SamplerError, match="--steps 1001: this DDPM has 1000 steps"):
        sample(run_config(run, tmp_path / "x", steps=1001))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"steps": 0}, "--steps must be >= 1"),
        ({"sampler": "lms"}, "--sampler 'lms' is not one of"),
        ({"cfg_interval": (0.8, 0.2)}, "--cfg-interval needs"),
        ({"fid_samples": 30, "classes": ("1",)}, "--fid-samples makes every class"),
        ({"weights": "best"}, "--weights must be one of"),
    ],
)
def test_bad_configs(tmp_path, kw, match):
    with pytest.raises(SamplerError, match=match):
        run_config(tmp_path, tmp_path, **kw)


def test_training_hook_writes_a_grid(flow_run, tiny_vae_dir, tmp_path):
    from sampler.training import sample_grid_hook
    from trainer.checkpoint import load_for_inference

    model, meta = load_for_inference(flow_run)
    sample_grid_hook(str(tiny_vae_dir), steps=2)(model, meta, 7, tmp_path)
    grid = outputs.read_png(tmp_path / "samples" / "0000007.png")
    assert grid.shape == (2 * 32 + 2, 2 * 32 + 2, 3)  # 3 classes in a 2x2 grid


# --- the command line ------------------------------------------------------------------------------


def one_line_error(result, match: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.output


def test_cli_train_then_sample(tmp_path, tiny_vae_dir, monkeypatch):
    """A real 2-step `latentdit train` run, then `latentdit sample` on its run dir."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the store's VAE id is looked up in the cache only
    store = write_store(tmp_path / "s.zarr", n=16, size=4)
    run = tmp_path / "run"
    train_args = ["train", "--store", str(store), "--run", str(run), "--model", "DiT-S/2"]
    tiny = ["--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--batch-size", "8"]
    hook = ["--vae", str(tiny_vae_dir), "--sample-every", "1"]  # grids through sampler.training
    done = runner.invoke(app, [*train_args, *tiny, *hook, "--steps", "2", "--warmup-steps", "0"])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["0000001.png", "0000002.png"]
    out = tmp_path / "out"
    args = ["sample", str(run), "--out", str(out), "--vae", str(tiny_vae_dir), "--steps", "2"]
    done = runner.invoke(
        app, [*args, "--class", "class 1", "--class", "n00000002", "--n", "2", "--npz"]
    )
    assert done.exit_code == 0, done.output
    assert "4 images (4 made now)" in done.output
    assert len(pngs(out)) == 4 and (out / "grid.png").is_file()
    with np.load(out / "samples_4x32x32x3.npz") as data:
        assert data["arr_0"].shape == (4, 32, 32, 3)
    one_line_error(runner.invoke(app, [*args, "--class", "zebra"]), "--class 'zebra'")
    one_line_error(
        runner.invoke(app, ["sample", str(tmp_path / "missing"), "--out", str(out)]),
        "missing: no such run dir or checkpoint folder",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(
        runner.invoke(app, ["sample", str(empty), "--out", str(out)]), "no checkpoint here"
    )
    one_line_error(  # the store recorded "tests/tiny-vae", which is neither a folder nor on the hub
        runner.invoke(app, ["sample", str(run), "--out", str(tmp_path / "o2"), "--steps", "1"]),
        "tests/tiny-vae",
    )
    wide = make_tiny_vae(tmp_path / "wide", latent_channels=8)
    one_line_error(
        runner.invoke(app, ["sample", str(run), "--out", str(tmp_path / "o3"), "--vae", str(wide)]),
        "latent channels 4 (checkpoint",
    )
