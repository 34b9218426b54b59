"""Normalization per position through the checkpoint and the sampler; loss terms in the log."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_store
from safetensors.torch import save_file
from test_trainer import runner
from test_trainer_runs import cli_args, read_log, tiny_options
from test_v1_stores import ASSETS

from cli import app
from latent_store import load_latents, open_store
from latent_store.finalize import position_stats
from latent_store.quantize import decode
from sampler.config import SampleConfig, SolveConfig
from sampler.decoder import LatentDecoder
from sampler.sample import sample
from trainer.checkpoint import CheckpointDamagedError, latest_checkpoint, load_for_inference
from trainer.config import resolve_config
from trainer.normalization import (
    NORMALIZATION_FILE,
    POSITION_EPS,
    LatentNormalization,
    NormalizationError,
    normalization_from_store,
)
from trainer.train import train


@pytest.fixture(scope="module")
def position_run(tmp_path_factory) -> Path:
    """A tiny run trained 2 steps with --normalization position_stats (4x8x8 latents)."""
    root = tmp_path_factory.mktemp("position")
    store = write_store(root / "s.zarr", n=16, variants=2)
    options = tiny_options(store, root / "run", steps=2, normalization="position_stats")
    train(resolve_config(None, options))
    return root / "run"


def _store(run: Path) -> Path:
    return run.parent / "s.zarr"


def test_position_stats_normalize_each_position(position_run):
    store = open_store(_store(position_run))
    norm = normalization_from_store(store, "position_stats")
    row = position_stats(store, "latents")
    assert norm.mean.shape == norm.std.shape == (4, 8, 8)
    np.testing.assert_array_equal(norm.mean, row[0])
    np.testing.assert_allclose(
        norm.std, np.sqrt(row[1].astype(np.float64) + POSITION_EPS), rtol=1e-6
    )
    x = decode(load_latents(store).latents, store.spec.array("latents")).flatten(0, 1)
    z = norm.normalize(x)  # every stored sample and variant: centred and scaled per position
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0, unbiased=False) - 1).abs().max() < 1e-3
    torch.testing.assert_close(norm.denormalize(z), x)


def test_the_checkpoint_keeps_the_values_in_a_file_named_with_their_digest(position_run):
    folder = latest_checkpoint(position_run)
    recorded = json.loads((folder / "meta.json").read_text())["normalization"]
    assert set(recorded) == {"kind", "shape", "file", "digest"} and recorded["shape"] == [4, 8, 8]
    assert (folder / recorded["file"]).is_file() and recorded["file"] == NORMALIZATION_FILE
    trained = normalization_from_store(open_store(_store(position_run)), "position_stats")
    _, meta = load_for_inference(position_run)
    assert LatentNormalization.from_meta(meta["normalization"]) == trained
    assert LatentNormalization.from_meta(recorded, folder) == trained


def test_the_sampler_inverts_what_the_trainer_applied(position_run, tiny_vae_dir, tmp_path):
    trained = normalization_from_store(open_store(_store(position_run)), "position_stats")
    _, meta = load_for_inference(position_run)
    decoder = LatentDecoder.load(str(tiny_vae_dir), meta)
    z = torch.randn(3, 4, 8, 8)
    want = z * torch.from_numpy(trained.std) + torch.from_numpy(trained.mean)
    torch.testing.assert_close(decoder.normalization.denormalize(z), want)
    out = tmp_path / "samples"
    solve = SolveConfig(steps=2, cfg=1.0)
    kw = dict(vae=str(tiny_vae_dir), n=2, save_latents=True, solve=solve)
    cfg = SampleConfig(checkpoint=position_run, out=out, **kw)
    assert sample(cfg).made == 2
    saved = np.load(out / "latents.npy")  # what the decoder took: the trainer's map inverted
    assert saved.shape == (2, 4, 8, 8) and len(list((out / "images").glob("*.png"))) == 2


def test_a_position_stats_run_resumes(position_run):
    options = tiny_options(_store(position_run), position_run, steps=3)
    assert train(resolve_config(None, {**options, "normalization": "position_stats"})).steps == 3


def test_a_damaged_normalization_file_is_refused(position_run, tmp_path):
    folder = latest_checkpoint(position_run)
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    values = {k: torch.zeros(4, 8, 8) + 1 for k in ("mean", "std")}
    save_file(values, copy / NORMALIZATION_FILE)
    with pytest.raises(NormalizationError, match="does not match the digest"):
        load_for_inference(copy)
    (copy / NORMALIZATION_FILE).unlink()  # the manifest lists it: the checkpoint is damaged
    with pytest.raises(CheckpointDamagedError, match=f"{NORMALIZATION_FILE} is missing"):
        load_for_inference(copy)


def test_position_stats_of_a_v1_store_is_one_line(tmp_path):
    with zipfile.ZipFile(ASSETS / "v1_stores.zip") as z:
        z.extractall(tmp_path)
    store = tmp_path / "v1_mean.zarr"
    options = tiny_options(store, tmp_path / "run", steps=1, batch_size=4)
    result = runner.invoke(app, ["train", *cli_args(options), "--normalization", "position_stats"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert "re-encode it" in result.output and "channel_stats" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "options, terms",
    [
        ({}, {"mse"}),
        ({"objective": "ddpm", "learn_sigma": True}, {"mse", "vlb"}),
    ],
)
def test_loss_terms_are_in_the_log(tmp_path, options, terms):
    store = write_store(tmp_path / "s.zarr", n=16)
    train(resolve_config(None, tiny_options(store, tmp_path / "run", steps=3, **options)))
    for record in read_log(tmp_path / "run"):
        logged = {k.removeprefix("loss_") for k in record if k.startswith("loss_")}
        assert logged == terms, record
        assert record["loss"] == pytest.approx(sum(record[f"loss_{t}"] for t in terms), rel=1e-5)
