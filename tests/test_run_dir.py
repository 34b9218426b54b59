"""Run folders: a bare `--run` resumes from RUN/config.json; a refused resume changes nothing."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import TINY_DIT, write_store
from typer.testing import CliRunner

from cli import app
from foundation.config import resolve_config as resolve_options
from trainer.config import TrainConfig
from trainer.run_dir import saved_config
from trainer.train import train

runner = CliRunner()


def _files(folder: Path) -> dict[str, str]:
    """blake2b of every file under `folder` (and the set of names: nothing added or removed)."""
    return {
        str(p.relative_to(folder)): hashlib.blake2b(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(store, run): 4 steps with lr 2e-3 and --no-grad-clip, a checkpoint every 2 steps."""
    root = tmp_path_factory.mktemp("run-dir")
    store = write_store(root / "s.zarr", n=24)
    options = {"store": str(store), "run": str(root / "run"), **TINY_DIT, "batch_size": 8}
    options.update(steps=4, ckpt_every=2, warmup_steps=0, lr=2e-3, log_every=1, grad_clip=None)
    summary = train(TrainConfig(**options))  # (resolve_config reads None as "not given")
    assert summary.steps == 4 and summary.checkpoint.name == "0000004"
    return store, root / "run"


REFUSED = {
    "changed lr": (["--lr", "0.5"], r"--lr: 0\.002 \(run\) vs 0\.5 \(now\)"),
    "changed model": (["--depth", "3"], r"--depth: 2 \(run\) vs 3 \(now\)"),
    "changed seed": (["--seed", "1"], r"--seed: 0 \(run\) vs 1 \(now\)"),
    "clip back on": (["--grad-clip", "1.0"], r"--grad-clip: None \(run\) vs 1\.0 \(now\)"),
    "changed precision": (["--precision", "bf16"], r"--precision: 'auto' \(run\) vs 'bf16'"),
    "steps below": (["--steps", "2"], r"--steps 2 is below the step of .*0000004 \(4\)"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_resume_changes_nothing(trained, case):
    _, run = trained
    before = _files(run)
    args, match = REFUSED[case]
    result = runner.invoke(app, ["train", "--run", str(run), *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("error:")
    assert "Traceback" not in result.output
    assert re.search(match, result.output), result.output
    assert _files(run) == before


def test_resume_on_other_data_changes_nothing(trained, tmp_path):
    _, run = trained
    before = _files(run)
    other = write_store(tmp_path / "other.zarr", n=24, seed=7)
    result = runner.invoke(app, ["train", "--run", str(run), "--store", str(other), "--steps", "6"])
    assert result.exit_code == 2 and "with other data" in result.output, result.output
    assert _files(run) == before


def _resolve(config_file, overrides: dict) -> TrainConfig:
    """What `latentdit train` resolves: defaults < the run's config.json < --config < options."""
    base = saved_config(overrides["run"])
    return resolve_options(TrainConfig, config_file, overrides, command="train", base=base)


def test_safe_changes_and_the_runs_own_config(trained, tmp_path):
    _, run = trained
    cfg = _resolve(None, {"run": str(run), "steps": 9, "log_every": 3, "data": "stream"})
    assert (cfg.steps, cfg.log_every, cfg.data, cfg.lr, cfg.grad_clip) == (
        9,
        3,
        "stream",
        2e-3,
        None,
    )
    own = _resolve(run / "config.json", {"run": str(run)})
    assert own == _resolve(None, {"run": str(run)})
    copy = tmp_path / "copy.json"  # a saved config starts a new run elsewhere
    copy.write_text((run / "config.json").read_text())
    fresh = _resolve(copy, {"run": str(tmp_path / "new")})
    assert fresh.lr == 2e-3 and fresh.run == str(tmp_path / "new")
    result = runner.invoke(app, ["train", "--config", str(run / "config.json"), "--steps", "4"])
    assert result.exit_code == 0 and "step 4" in result.output, result.output


def test_bare_resume_trains_further_with_the_saved_options(trained, tmp_path):
    store, run = trained[0], tmp_path / "run"
    shutil.copytree(trained[1], run)
    result = runner.invoke(app, ["train", "--run", str(run), "--steps", "6"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())
    assert (saved["steps"], saved["lr"], saved["grad_clip"]) == (6, 2e-3, None)
    assert "step 6 (resumed at step 4), 2 steps" in result.output
    assert "parameters" in result.output and "checkpoint   " + str(run) in result.output
    assert f"latentdit sample {run}" in result.output
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    # the same 6 steps in one go: bit for bit the same losses
    train(TrainConfig(**{**saved, "run": str(tmp_path / "straight"), "store": str(store)}))
    straight = [
        json.loads(line) for line in (tmp_path / "straight/log.jsonl").read_text().splitlines()
    ]
    assert [r["loss"] for r in log] == [r["loss"] for r in straight]
