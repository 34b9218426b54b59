"""Training runs on a tiny store with patch 1 and with the DDT head: train, resume exactly,
compile with recomputed head blocks, and sample PNGs through `latentdit sample`."""

from __future__ import annotations

import json

import pytest
from conftest import write_store
from PIL import Image
from test_trainer_runs import cli_args, read_log, tiny_options
from typer.testing import CliRunner

from cli import app
from trainer.checkpoint import load_for_inference
from trainer.config import resolve_config
from trainer.train import train

runner = CliRunner()
HEAD = {"model": "DiT-DH-S/1", "head_width": 32, "head_heads": 2}  # depth 2: the preset's


def _train(tmp_path, store, name: str, **kw) -> list[dict]:
    train(resolve_config(None, tiny_options(store, tmp_path / name, **kw)))
    return read_log(tmp_path / name)


def _sample_pngs(tmp_path, run, vae) -> list[Image.Image]:
    out = tmp_path / f"{run.name}-samples"
    args = ["sample", str(run), "--out", str(out), "--vae", str(vae), "--n", "2", "--steps", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return [Image.open(p) for p in sorted((out / "images").glob("*.png"))]


@pytest.mark.parametrize("model", [{"model": "DiT-S/1"}, HEAD])
def test_patch_1_and_the_head_train_and_sample(tmp_path, tiny_vae_dir, model):
    """The CLI trains (its flags set the head), the checkpoint records the config, and
    `latentdit sample` rebuilds the model and decodes PNGs of the VAE's size (8 x 8 latents)."""
    store = write_store(tmp_path / "s.zarr", n=16, size=8)
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", *cli_args(tiny_options(store, run, steps=3, **model))])
    assert result.exit_code == 0, result.output
    loaded, meta = load_for_inference(run)
    config = meta["model"]["config"]
    assert config["patch_size"] == 1 and meta["model"]["preset"] == model["model"]
    if model is HEAD:
        assert (config["head_depth"], config["head_width"], config["head_heads"]) == (2, 32, 2)
        assert loaded.head is not None and len(loaded.head.blocks) == 2
    else:
        assert "head_depth" not in config and loaded.head is None
    assert json.loads((run / "config.json").read_text())["head_width"] == model.get("head_width")
    images = _sample_pngs(tmp_path, run, tiny_vae_dir)
    assert len(images) >= 2 and all(im.size == (64, 64) for im in images)


def test_head_run_resumes_exactly_and_compiles_with_recomputed_head_blocks(tmp_path):
    """A run with the head stopped at a checkpoint and resumed equals an uninterrupted one bit
    for bit; --compile (each trunk and head block) with --checkpoint-blocks reaching into the
    head gives the eager losses within float rounding."""
    store = write_store(tmp_path / "s.zarr", n=24, variants=2, size=4)
    straight = _train(tmp_path, store, "straight", steps=4, ckpt_every=2, **HEAD)
    _train(tmp_path, store, "resumed", steps=2, ckpt_every=2, **HEAD)
    resumed = _train(tmp_path, store, "resumed", steps=4, ckpt_every=2, **HEAD)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    for name in ("model.safetensors", "ema.safetensors"):
        ckpt = f"checkpoints/0000004/{name}"
        assert (tmp_path / "resumed" / ckpt).read_bytes() == (
            tmp_path / "straight" / ckpt
        ).read_bytes()
    recomputed = _train(tmp_path, store, "recomputed", steps=4, checkpoint_blocks=3, **HEAD)
    compiled = _train(
        tmp_path,
        store,
        "compiled",
        steps=4,
        compile=True,
        compile_scope="blocks",
        checkpoint_blocks=3,
        **HEAD,
    )
    for a, b, c in zip(straight, recomputed, compiled, strict=True):
        assert a["loss"] == b["loss"]
        assert a["loss"] == pytest.approx(c["loss"], rel=1e-4)
