"""`latentdit train --wandb` with the real wandb package in offline mode: the files name the run,
hold the losses and the EMA grid, and a resumed run continues the same W&B run."""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
from conftest import ROOT, TINY_TRAIN, train_cli, write_store
from test_evaluation_ranks import ENV, TORCHRUN
from typer.testing import CliRunner

from cli import app
from trainer.config import ConfigError, TrainConfig

runner = CliRunner()


def test_offline_files_name_the_run_and_a_resume_continues_it(tmp_path, monkeypatch, tiny_vae_dir):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    store, run = write_store(tmp_path / "s.zarr", n=16, size=4), tmp_path / "run"
    train_cli(
        *TINY_TRAIN,
        "--store",
        store,
        "--run",
        run,
        "--steps",
        2,
        "--vae",
        tiny_vae_dir,
        "--sample-every",
        1,
        "--wandb",
        "--wandb-project",
        "tiny-proj",
        "--wandb-name",
        "tiny-dit-run",
    )
    saved = json.loads((run / "wandb.json").read_text())
    assert saved == {"id": saved["id"], "project": "tiny-proj", "name": "tiny-dit-run"}
    (first,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    assert first.name.endswith(f"-{saved['id']}")
    data = (first / f"run-{saved['id']}.wandb").read_bytes()
    for text in (
        b"tiny-dit-run",
        b"tiny-proj",
        b"train/loss",
        b"train/images_seen",
        b"samples/ema_grid",
    ):
        assert text in data, text
    assert list((first / "files" / "media" / "images").glob("samples/ema_grid_*.png"))
    assert b"storage_options" not in data  # never sent: it may hold credentials
    # the resume (its saved config keeps --wandb) logs to the same W&B run id
    train_cli("--run", run, "--steps", 3)
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{saved['id']}") for r in runs)
    assert json.loads((run / "wandb.json").read_text())["id"] == saved["id"]


def test_wandb_without_the_package_is_one_line(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else find_spec(name, *a),
    )
    with pytest.raises(ConfigError, match=r"--wandb needs the wandb package: pip install"):
        TrainConfig(store="s", run="r", wandb=True)
    r = runner.invoke(
        app, ["train", "--store", str(tmp_path), "--run", str(tmp_path / "r"), "--wandb"]
    )
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "latentdit[wandb]" in r.stderr


def test_only_rank_0_logs_to_wandb(tmp_path):
    """torchrun, 2 gloo ranks with --wandb offline: one W&B run, written by rank 0."""
    pytest.importorskip("wandb")
    store = write_store(tmp_path / "s.zarr", n=16, size=4)
    env = {
        **ENV,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wb"),
        "WANDB_SILENT": "true",
    }
    (tmp_path / "wb").mkdir()
    args = [
        *TINY_TRAIN,
        "--store",
        store,
        "--run",
        tmp_path / "run",
        "--steps",
        2,
        "--device",
        "cpu",
        "--wandb",
    ]
    command = [*TORCHRUN, str(ROOT / "cli.py"), "--", "train", *map(str, args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    assert run.name.endswith(json.loads((tmp_path / "run" / "wandb.json").read_text())["id"])
