"""REPA import refusals (one line, nothing written), and `import` + `sample --protocol repa-fid`."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from test_import import FIXTURES
from test_repa import MODEL, TINY, import_repa
from typer.testing import CliRunner

from cli import app
from sampler.config import SolveConfig
from sampler.errors import CheckpointImportError, SamplerError
from sampler.import_config import ImportConfig
from sampler.importer import SAFE_GLOBALS, import_checkpoint
from sampler.latents import pick_solver
from trainer.objective import FlowMatching

runner = CliRunner()


def _with_args(tmp_path, **changes):
    """repa_train.pt with some train.py args changed."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        ckpt = torch.load(FIXTURES / "repa_train.pt", weights_only=True)
    ckpt["args"] = argparse.Namespace(**{**vars(ckpt["args"]), **changes})
    path = tmp_path / "changed.pt"
    torch.save(ckpt, path)
    return path


def _misshapen(tmp_path):
    """A bare REPA file whose final layer reads a wider decoder_hidden_size than the blocks give."""
    state = torch.load(FIXTURES / "repa_bare.pt", weights_only=True)
    state["final_layer.linear.weight"] = torch.zeros(
        state["final_layer.linear.weight"].shape[0], 48
    )
    torch.save(state, tmp_path / "misshapen.pt")
    return tmp_path / "misshapen.pt"


CHANGED = {
    "cosine": {"path_type": "cosine"},
    "qk_norm": {"qk_norm": True},
    "weighting": {"weighting": "sigmoid"},
    "classes": {"num_classes": 10},
}


@pytest.mark.parametrize(
    ("case", "flags", "match"),
    [
        ("repa_train", {"format": "sit"}, r"args are REPA's, not SiT's; use --format repa"),
        ("repa_train", {"format": "dit"}, r"args are REPA's, not DiT's; use --format repa"),
        ("repa_bare", {"format": "sit"}, r"holds REPA projectors \(projectors\.0\..*--format repa"),
        ("sit_train", {}, r"args are SiT's, not REPA's; use --format sit"),
        ("dit_train", {}, r"args are DiT's, not REPA's; use --format dit"),
        ("dit_bare", {}, r"no projectors\.\* tensors, so not a REPA SiT.*--format sit or dit"),
        ("cosine", {}, r"REPA path_type 'cosine' is not supported; only 'linear'"),
        ("qk_norm", {}, r"REPA qk_norm True is not supported; only False"),
        ("weighting", {}, r"REPA weighting 'sigmoid' is not one of uniform, lognormal"),
        ("classes", {}, r"label table has 1000 classes \(\+ null\), its args say num_classes 10"),
        ("misshapen", {}, r"final_layer\.linear\.weight is \(16, 48\), expected \(16, 32\)"),
        (
            "repa_train",
            {"hidden_size": None},
            r"hidden_size 32, the checkpoint's args.model SiT-B/2",
        ),
        ("repa_bare", {"hidden_size": 64}, r"hidden_size 32, --hidden-size says 64"),
        ("repa_bare", {"depth": 2}, r"depth 3, --depth says 2"),
    ],
)
def test_bad_repa_input_is_one_line_and_writes_nothing(tmp_path, tiny_vae_dir, case, flags, match):
    if case in CHANGED:
        path = _with_args(tmp_path, **CHANGED[case])
    else:
        path = _misshapen(tmp_path) if case == "misshapen" else FIXTURES / f"{case}.pt"
    run = tmp_path / "run"
    options = {"format": "repa", **TINY, **flags}
    with pytest.raises(CheckpointImportError, match=match) as err:
        import_checkpoint(ImportConfig(checkpoint=path, run=run, vae=str(tiny_vae_dir), **options))
    assert "\n" not in str(err.value)
    assert not run.exists()


def test_repa_solvers_refuse_options_they_do_not_take():
    objective = FlowMatching(timesteps="uniform", time_scale=1.0)
    for option, value in (("shift", 3.0), ("diffusion", 2.0), ("last_step", 0.1)):
        cfg = SolveConfig(sampler="repa-euler-maruyama", **{option: value})
        flag = option.replace("_", "-")
        with pytest.raises(SamplerError, match=rf"--{flag} applies to the .* only, not repa-euler"):
            pick_solver(cfg, objective)
    name, _, kwargs = pick_solver(SolveConfig(sampler="repa-heun"), objective)
    assert (name, kwargs) == ("repa-heun", {})
    _, _, kwargs = pick_solver(SolveConfig(sampler="euler-maruyama", last_step=0.04), objective)
    assert kwargs == {"shift": 1.0, "diffusion": 1.0, "last_step": 0.04}


def test_cli_import_then_sample_with_the_repa_protocol(tmp_path, tiny_vae_dir):
    run, out = tmp_path / "run", tmp_path / "samples"
    tiny = ["--hidden-size", "32", "--depth", "3", "--num-heads", "2"]
    result = runner.invoke(
        app,
        [
            "import",
            str(FIXTURES / "repa_train.pt"),
            "--run",
            str(run),
            "--format",
            "repa",
            "--vae",
            str(tiny_vae_dir),
            *tiny,
        ],
    )
    assert result.exit_code == 0, result.output
    meta = json.loads(next((run / "checkpoints").glob("*/meta.json")).read_text())
    assert meta["source"]["projectors"]["dropped_tensors"] == 6
    result = runner.invoke(
        app,
        [
            "sample",
            str(run),
            "--out",
            str(out),
            "--protocol",
            "repa-fid",
            "--steps",
            "4",
            "--n",
            "3",
            "--save-latents",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(list((out / "images").glob("*.png"))) == 3
    settings = json.loads((out / "sample.json").read_text())
    assert settings == {
        **settings,
        "sampler": "repa-euler-maruyama",
        "steps": 4,
        "cfg": 1.8,
        "cfg_interval": [0.0, 0.7],
    }
    wrong = runner.invoke(
        app,
        [
            "import",
            str(FIXTURES / "repa_train.pt"),
            "--run",
            str(tmp_path / "r2"),
            "--format",
            "sit",
            *tiny,
        ],
    )
    assert wrong.exit_code == 2 and "use --format repa" in wrong.output
    assert "Traceback" not in wrong.output and not (tmp_path / "r2").exists()


def test_train_fine_tunes_an_imported_repa_model_in_its_time(tmp_path, tiny_vae_dir):
    from conftest import write_store

    from trainer.checkpoint import load_checkpoint
    from trainer.config import resolve_config
    from trainer.train import train

    import_repa(tmp_path / "imported", tiny_vae_dir)
    store = write_store(tmp_path / "store.zarr", n=16, classes=MODEL["num_classes"])
    options = {
        "store": str(store),
        "run": str(tmp_path / "run"),
        "model": "DiT-S/2",
        **TINY,
        "normalization": "vae_scaling",
        "init": str(tmp_path / "imported"),
        "steps": 1,
        "batch_size": 8,
        "warmup_steps": 0,
        "timesteps": "uniform",
    }
    meta = load_checkpoint(train(resolve_config(None, options)).run).meta
    assert meta["objective"] == {**meta["objective"], "time_scale": 1.0, "reverse_time": False}
