"""Every autoencoder family end to end on the command line: encode a small image tree, compare the
stored codes with diffusers' own latents, validate with --decode-check, train a tiny DiT, sample
PNGs, evaluate the store's reconstruction floor; and the bad inputs, each one line."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from latent_store import LatentStore, dequantize
from pipeline.loader import collate, load_item
from pipeline.preprocess import PreprocessConfig
from pipeline.source import reopen_source
from testkit import TINY_AUTOENCODERS, TINY_DIT
from testkit.autoencoders import reference_latents

SIZE = 32
ENCODE = ["--image-size", str(SIZE), "--workers", "0", "--device", "cpu", "--batch-size", "4"]
ENCODE += ["--shard-size", "8", "--chunk-size", "4", "--calibration-samples", "64", "--flip"]
ENCODE += ["--max-failures", "6", "--max-pixels", "500000"]
TRAIN = ["--hidden-size", str(TINY_DIT["hidden_size"]), "--depth", str(TINY_DIT["depth"])]
TRAIN += ["--num-heads", str(TINY_DIT["num_heads"]), "--steps", "2", "--batch-size", "4"]
TRAIN += ["--warmup-steps", "0", "--device", "cpu"]
TINY_HEAD = ["--head-depth", "1", "--head-width", "32", "--head-heads", "2"]
# each family once; FLUX.2 through a pipeline folder (its vae/) with the moments posterior; the
# presets the docs recommend, at patch 1 where they do (RAE with its DDT head)
RUNS = {
    "kl16": {"posterior": "mean", "pipeline": False, "model": ["--model", "DiT-S/2"]},
    "flux2": {"posterior": "moments", "pipeline": True, "model": ["--model", "DiT-S/1"]},
    "dc": {"posterior": "mean", "pipeline": False, "model": ["--model", "DiT-S/1"]},
    "rae-dinov2": {
        "posterior": "mean",
        "pipeline": False,
        "model": ["--model", "DiT-DH-S/1", *TINY_HEAD],
    },
}
runner = CliRunner()


def invoke(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, tiny_autoencoders, image_tree, tmp_path_factory, monkeypatch_module):
    """A family's store, encoded through the CLI from the generated ImageNet tree."""
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    name, opts = request.param, RUNS[request.param]
    root = tmp_path_factory.mktemp(name)
    vae = tiny_autoencoders[name]
    if opts["pipeline"]:
        shutil.copytree(vae, root / "pipe" / "vae")
        (root / "pipe" / "model_index.json").write_text('{"_class_name": "Flux2Pipeline"}')
        vae = root / "pipe"
    store = root / "store.zarr"
    out = invoke(
        "encode",
        image_tree,
        "--out",
        store,
        "--vae",
        vae,
        "--posterior",
        opts["posterior"],
        *ENCODE,
    )
    assert "18 samples written, 4 failed" in out
    return SimpleNamespace(
        name=name, vae=vae, model=tiny_autoencoders[name], store=store, root=root
    )


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_the_store_records_the_family_and_holds_its_own_latents(run):
    """Dequantized codes are what the diffusers model itself returns for the same crops (and their
    flips), within one quantization step."""
    store = LatentStore(run.store)
    spec, tiny = store.spec, TINY_AUTOENCODERS[run.name]
    assert spec.vae.cls == tiny.family and spec.vae.downsampling * spec.latent_shape[-1] == SIZE
    assert spec.vae.posterior_kind == ("deterministic" if tiny.deterministic else "gaussian")
    assert spec.vae.image_range == ((0.0, 1.0) if "RAE" in tiny.family else (-1.0, 1.0))
    assert store.array("latents").shape[1:] == (2, *spec.latent_shape)
    if spec.posterior == "moments":
        assert store.array("logstd").shape == store.array("latents").shape
    source = reopen_source(spec.source)
    labels = store.array("labels")[:]
    written = np.flatnonzero(labels >= 0)
    batch = collate([load_item(source, int(i), PreprocessConfig(image_size=SIZE)) for i in written])
    crops = batch.crops.permute(0, 3, 1, 2)
    stored = dequantize(store.array("latents").get_orthogonal_selection(written), spec.quant)
    step = torch.tensor(spec.quant.scale).view(1, -1, 1, 1)
    assert sum(r.clipped for r in store.records()) == 0
    for variant, pixels in enumerate([crops, crops.flip(3)]):
        want = reference_latents(run.model, pixels)
        assert ((stored[:, variant] - want).abs() <= step * 1.001).all(), run.name


def test_validate_with_the_decode_check(run):
    report = json.loads(
        invoke("validate", run.store, "--decode-check", "4", "--min-psnr", "0", "--json")
    )
    assert report["ok"] and report["decode_check"]["samples"] == 4
    assert np.isfinite(report["decode_check"]["psnr_stored_db"])


def test_train_sample_and_evaluate_the_reconstruction_floor(run, tiny_inception):
    """A few DiT steps on the store, PNGs of the crop size from the decoder alone, and evaluate's
    FID of the store decoded (the reconstruction floor) against them."""
    train_run = run.root / "run"
    invoke("train", "--store", run.store, "--run", train_run, *RUNS[run.name]["model"], *TRAIN)
    out = run.root / "samples"
    invoke("sample", train_run, "--out", out, "--n", "2", "--steps", "2", "--device", "cpu")
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) >= 2 and all(Image.open(p).size == (SIZE, SIZE) for p in pngs)
    report = json.loads(
        invoke(
            "evaluate",
            run.store,
            "--ref",
            out / "images",
            "--inception",
            tiny_inception,
            "--workers",
            "0",
            "--device",
            "cpu",
            "--json",
        )
    )
    assert report["samples"]["kind"] == "store" and report["samples"]["count"] == 18
    assert np.isfinite(report["fid"])


@pytest.mark.parametrize(
    "family, flags, match",
    [
        ("dc", ["--posterior", "sample"], "--posterior sample: AutoencoderDC .* is deterministic"),
        ("rae-dinov2", ["--posterior", "moments"], "--posterior moments: .* is deterministic"),
        ("kl4", ["--image-size", "36"], "--image-size 36 is not a multiple of 8: AutoencoderKL"),
        ("rae-dinov2", ["--image-size", "64"], "--image-size 64: AutoencoderRAE .* takes 32-px"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tiny_autoencoders, image_tree, tmp_path, family, flags, match
):
    import re

    out = tmp_path / "o.zarr"
    args = ["encode", image_tree, "--out", out, "--vae", tiny_autoencoders[family], *ENCODE, *flags]
    result = runner.invoke(app, [str(a) for a in args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
        result.output
    )
    assert re.search(match, lines[0]), lines[0]
    assert not out.exists()


def test_an_unsupported_model_class_is_one_line(image_tree, tmp_path):
    from diffusers import UNet2DModel

    unet = tmp_path / "unet"
    blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
    UNet2DModel(block_out_channels=(8, 8), norm_num_groups=4, **blocks).save_pretrained(unet)
    out = tmp_path / "o.zarr"
    result = runner.invoke(app, ["encode", str(image_tree), "--out", str(out), "--vae", str(unet)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "a UNet2DModel, not a supported autoencoder; use one of AutoencoderKL" in result.output
    assert not out.exists()
