"""Importing official checkpoints: bad input, the CLI end to end, fine-tuning an imported model."""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from test_import import FIXTURES, TINY, C, import_fixtures, load
from typer.testing import CliRunner

from cli import app
from sampler.config import SolveConfig
from sampler.errors import CheckpointImportError
from sampler.import_config import ImportConfig
from sampler.importer import import_checkpoint
from sampler.latents import make_latents
from trainer.checkpoint import load_for_inference
from trainer.objective import objective_from_meta

runner = CliRunner()


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_vae_dir) -> dict[str, Path]:
    return import_fixtures(tmp_path_factory, tiny_vae_dir)


# --- bad input --------------------------------------------------------------------------------


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _bad_files(tmp: Path) -> dict[str, Path]:
    files = {}
    files["unsafe"] = tmp / "unsafe.pt"
    torch.save({"model": Evil(), "ema": {}}, files["unsafe"])
    files["pickle"] = tmp / "plain.pkl"
    files["pickle"].write_bytes(pickle.dumps({"model": Evil()}, protocol=4))
    files["not_dit"] = tmp / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, files["not_dit"])
    files["junk"] = tmp / "junk.pt"
    files["junk"].write_bytes(b"not a checkpoint")
    files["list"] = tmp / "list.pt"
    torch.save([1, 2], files["list"])
    return files


@pytest.mark.parametrize(
    ("case", "flags", "match"),
    [
        ("unsafe", {}, r"refusing to unpickle print: only state dicts"),
        ("pickle", {}, r"not a torch checkpoint that loads with weights_only=True"),
        ("not_dit", {}, r"not a DiT/SiT checkpoint \(no x_embedder"),
        ("junk", {}, r"not a torch checkpoint that loads"),
        ("list", {}, r"not a DiT/SiT checkpoint \(a list"),
        ("dit_train", {}, r"hidden_size 32, the checkpoint's args.model DiT-S/2 says 384"),
        (
            "dit_train",
            {"hidden_size": 64, "depth": 2, "num_heads": 2},
            r"hidden_size 32, --hidden-size says 64",
        ),
        ("dit_bare", {"model": "DiT-XL/2"}, r"hidden_size 32, --model DiT-XL/2 says 1152"),
        ("dit_bare", {}, r"give --num-heads"),
        ("dit_bare", {"depth": 3, "hidden_size": 32, "num_heads": 2}, r"depth 2, --depth says 3"),
        ("dit_train", {**TINY, "weights": "opt"}, r"--weights 'opt' is not one of"),
        ("dit_train", {**TINY, "format": "sit"}, r"args are DiT's, not SiT's; use --format dit"),
        ("sit_train", {**TINY, "format": "dit"}, r"args are SiT's, not DiT's; use --format sit"),
        ("dit_train", {**TINY, "format": "adm"}, r"--format 'adm' is not one of"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_vae_dir, case, flags, match):
    files = _bad_files(tmp_path)
    path = files.get(case, FIXTURES / f"{case}.pt")
    run = tmp_path / "run"
    with pytest.raises(CheckpointImportError, match=match) as err:
        import_checkpoint(ImportConfig(checkpoint=path, run=run, vae=str(tiny_vae_dir), **flags))
    assert "\n" not in str(err.value)
    assert not run.exists()


def test_sit_with_another_path_is_refused(tmp_path, tiny_vae_dir):
    ckpt = torch.load(FIXTURES / "sit_train.pt", weights_only=False)
    ckpt["args"] = argparse.Namespace(**{**vars(ckpt["args"]), "path_type": "GVP"})
    torch.save(ckpt, tmp_path / "gvp.pt")
    with pytest.raises(CheckpointImportError, match=r"SiT path_type 'GVP' is not supported"):
        import_checkpoint(ImportConfig(checkpoint=tmp_path / "gvp.pt", run=tmp_path / "run",
                                       format="sit", vae=str(tiny_vae_dir), **TINY))  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_import_records_provenance(imported):
    _, meta = load(imported, "dit")
    src = meta["source"]
    assert src["layout"] == "train" and src["weights"] == "ema" and len(src["sha256"]) == 64
    assert meta["normalization"]["kind"] == "vae_scaling"
    assert meta["objective"] == {**meta["objective"], "kind": "ddpm", "learn_sigma": True}
    assert [c["id"] for c in meta["classes"]] == [str(i) for i in range(5)]


# --- CLI end to end ---------------------------------------------------------------------------


def test_cli_import_then_sample(tmp_path, tiny_vae_dir):
    run, out = tmp_path / "run", tmp_path / "samples"
    result = runner.invoke(app, ["import", str(FIXTURES / "dit_bare.pt"), "--run", str(run), "--format", "dit",
                                 "--vae", str(tiny_vae_dir), "--hidden-size", "32", "--depth", "2", "--num-heads", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    noise = np.random.default_rng(0).standard_normal((2, C, 8, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    result = runner.invoke(app, ["sample", str(run), "--out", str(out), "--protocol", "dit-fid", "--steps", "5",
                                 "--n", "2", "--class", "1", "--noise", str(tmp_path / "noise.npy"), "--save-latents"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list((out / "images").glob("*.png"))) == 2
    latents = np.load(out / "latents.npy")
    assert latents.shape == (2, C, 8, 8) and np.isfinite(latents).all()
    settings = json.loads((out / "sample.json").read_text())
    assert settings == {**settings, "sampler": "ddpm", "steps": 5, "cfg": 1.5, "cfg_channels": 3,
                        "variance": "learned", "spacing": "official"}  # fmt: skip
    assert "noise_blake2b" in settings and "labels_blake2b" in settings
    again = runner.invoke(app, ["import", str(FIXTURES / "dit_bare.pt"), "--run", str(run), "--vae", str(tiny_vae_dir), "--num-heads", "2"])  # fmt: skip
    assert again.exit_code == 2 and "already holds checkpoints" in again.output


# --- fine-tuning an imported model --------------------------------------------------------------


def test_train_fine_tunes_an_imported_dit_with_the_hybrid_loss(imported, tmp_path):
    from conftest import write_store

    from trainer.checkpoint import CheckpointMismatchError, load_checkpoint
    from trainer.config import resolve_config
    from trainer.train import train

    store = write_store(tmp_path / "store.zarr", n=16, classes=5)
    options = {"store": str(store), "run": str(tmp_path / "run"), "model": "DiT-S/2", **TINY,
               "objective": "ddpm", "learn_sigma": True, "normalization": "vae_scaling",
               "init": str(imported["dit"]), "steps": 2, "batch_size": 8, "warmup_steps": 0}  # fmt: skip
    run = train(resolve_config(None, options)).run
    ckpt = load_checkpoint(run)
    assert ckpt.meta["objective"]["learn_sigma"] and ckpt.meta["model"]["config"]["learn_sigma"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    imported_weights = load_for_inference(imported["dit"])[0].state_dict()
    moved = [k for k, v in ckpt.model_state.items() if not torch.equal(v, imported_weights[k])]
    assert moved and set(ckpt.model_state) == set(imported_weights)  # started there, then trained
    with pytest.raises(
        CheckpointMismatchError,
        match=r"its model \{'learn_sigma': True\} differs from this run's \{'learn_sigma': False\}",
    ):
        train(resolve_config(None, {**options, "run": str(tmp_path / "r2"), "learn_sigma": False}))


@pytest.mark.parametrize(
    ("solve", "match"),
    [
        (
            {"sampler": "ddim", "steps": 999, "spacing": "official"},
            r"no integer stride makes 999 DDIM steps",
        ),
        (
            {"sampler": "dpm++2m", "variance": "learned"},
            r"--variance applies to the ddpm sampler only",
        ),
        ({"sampler": "heun", "spacing": "official"}, r"is for flow_matching models"),
    ],
)
def test_bad_solver_options_for_an_imported_dit(imported, solve, match):
    from sampler.errors import SamplerError
    from sampler.latents import pick_solver

    _, meta = load(imported, "dit")
    with pytest.raises(SamplerError, match=match):
        pick_solver(SolveConfig(**solve), objective_from_meta(meta["objective"]), learn_sigma=True)


def test_every_ddpm_solver_runs_a_learn_sigma_model(imported):
    from sampler.plan import ImageNoise

    model, meta = load(imported, "dit")
    objective = objective_from_meta(meta["objective"])
    for sampler in ("ddpm", "ddim", "dpm++2m"):
        z = make_latents(model, objective, torch.tensor([0, 4]), ImageNoise(0, [0, 1]),
                         SolveConfig(sampler=sampler, steps=4, cfg=2.0, spacing="official"),
                         latent_shape=(C, 8, 8), device=torch.device("cpu"), precision="fp32")  # fmt: skip
        assert z.shape == (2, C, 8, 8) and torch.isfinite(z).all()


def test_sample_refuses_bad_noise_and_protocol(imported, tmp_path):
    np.save(tmp_path / "noise.npy", np.zeros((3, C, 8, 8), np.float32))
    base = [
        "sample",
        str(imported["dit"]),
        "--out",
        str(tmp_path / "s"),
        "--n",
        "2",
        "--steps",
        "2",
    ]
    result = runner.invoke(app, [*base, "--noise", str(tmp_path / "noise.npy")])
    assert result.exit_code == 2 and "shape (3, 4, 8, 8), need (2, 4, 8, 8)" in result.output
    result = runner.invoke(app, [*base, "--protocol", "adm"])
    assert (
        result.exit_code == 2 and "--protocol 'adm' is not one of dit-fid, sit-fid" in result.output
    )


def test_train_fine_tunes_an_imported_sit_in_its_time(imported, tmp_path):
    from conftest import write_store

    from trainer.checkpoint import load_checkpoint
    from trainer.config import resolve_config
    from trainer.train import train

    store = write_store(tmp_path / "store.zarr", n=16, classes=7)
    options = {"store": str(store), "run": str(tmp_path / "run"), "model": "DiT-S/4", **TINY,
               "normalization": "vae_scaling", "init": str(imported["sit"]), "steps": 1,
               "batch_size": 8, "warmup_steps": 0, "timesteps": "uniform"}  # fmt: skip
    meta = load_checkpoint(train(resolve_config(None, options)).run).meta
    assert meta["objective"] == {
        **meta["objective"],
        "reverse_time": True,
        "time_scale": 1.0,
        "t0": "noise",
    }
