"""A disk that fills up while a command writes: encode (creating the store, and mid-shard), a
training checkpoint, the sampler's `.npz`.

Where the test can mount a small tmpfs (root, or an unprivileged user namespace: `unshare -rm`),
the disk really fills: at the chosen moment the command's own process writes a filler until the
kernel answers ENOSPC (`tests/jobs/disk_full.py`, action fill). Where it cannot, the same moment starts
a simulated ENOSPC on every later opening for writing under the folder (action fail). The steps
run in `tests/jobs/fault_steps.py` (inside the namespace, when there is one), which reports each
step's exit code, stderr and the digest of every file on the disk.

Each case asserts the one error line (what failed, what is intact, the command that resumes),
exit code 2, that every file written before is unchanged, and that after freeing the space the
same command finishes with exactly what an uninterrupted run makes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from cli_runs import ENV
from conftest import ROOT, TINY_DIT, make_checkpoint, store_contents, write_store
from test_pipeline import JOB_ARGS, _equal, job

from pipeline.encode import encode
from sampler.config import SampleConfig, SolveConfig
from sampler.sample import sample
from trainer.config import TrainConfig
from trainer.train import train

DRIVER = ROOT / "tests/jobs/fault_steps.py"
TMPFS_MB = 64


@cache
def tmpfs_mountable() -> bool:
    """Whether this process may mount a tmpfs in a mount namespace of its own."""
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt || exit 1"]
    return subprocess.run(probe, capture_output=True).returncode == 0


MODES = ["fill", "fail"] if tmpfs_mountable() else ["fail"]
MODE = MODES[0]  # the real disk when there is one


def run_steps(tmp_path: Path, steps: list[dict], mode: str) -> tuple[list[dict], Path]:
    """Run `steps` against tmp_path/disk (a fresh tmpfs in mode fill); (reports, copy of disk)."""
    disk, spec_file, report = tmp_path / "disk", tmp_path / "spec.json", tmp_path / "report.json"
    disk.mkdir()
    for step in steps:
        if step.get("inject") and step["inject"]["action"] != "kill":
            step["inject"]["action"] = mode
    spec = {"dir": str(disk), "steps": steps, "copy_out": str(tmp_path / "final")}
    spec_file.write_text(json.dumps(spec))
    command = [sys.executable, str(DRIVER), str(spec_file), str(report)]
    if mode == "fill":
        mount = f'mount -t tmpfs -o size={TMPFS_MB}m tmpfs "$0" && exec "$@"'
        command = ["unshare", "-rm", "sh", "-c", mount, str(disk), *command]
    subprocess.run(command, check=True, timeout=1200, cwd=ROOT, env={**os.environ, **ENV})
    return json.loads(report.read_text()), tmp_path / "final"


def one_error(step: dict) -> str:
    """The step's one error line (exit 2, no traceback)."""
    assert "Traceback" not in step["stderr"], step["stderr"]
    errors = [line for line in step["stderr"].splitlines() if line.startswith("error:")]
    assert step["rc"] == 2 and len(errors) == 1, (step["rc"], step["stderr"])
    return errors[0]


def unchanged(before: dict, after: dict, prefix: str) -> None:
    """Every file under `prefix` in `before` is in `after`, byte for byte."""
    kept = {k: v for k, v in before.items() if k.startswith(prefix)}
    assert kept, f"nothing under {prefix}"
    assert {k: after.get(k) for k in kept} == kept


# --- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_disk_full_while_writing_a_checkpoint(tmp_path, mode):
    store = write_store(tmp_path / "s.zarr", n=24)
    options = {**TINY_DIT, "batch_size": 8, "warmup_steps": 0, "log_every": 1, "ckpt_every": 2}
    args = [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    run = str(tmp_path / "disk" / "run")
    steps = [
        {"cli": ["train", "--store", str(store), "--run", run, "--steps", "2", *args]},
        {
            "cli": ["train", "--run", run, "--steps", "4"],
            "inject": {"when": "*/checkpoints/.tmp-0000004-*/state.pt", "action": mode},
        },
        {"free": True},
        {"cli": ["train", "--run", run, "--steps", "4"]},
    ]
    made, final = run_steps(tmp_path, steps, mode)
    assert made[0]["rc"] == 0, made[0]["stderr"]
    line = one_error(made[1])
    assert "out of space" in line and "while writing checkpoint" in line and "0000004" in line
    assert f"{run}/checkpoints/0000002 is intact" in line
    assert f"free some space, then resume with `latentdit train --run {run}`" in line
    unchanged(made[0]["files"], made[1]["files"], "run/checkpoints/")
    assert not any(".tmp-" in name for name in made[1]["files"])  # the partial folder is gone
    assert made[3]["rc"] == 0, made[3]["stderr"]
    unchanged(made[0]["files"], made[3]["files"], "run/checkpoints/0000002/")
    straight = tmp_path / "straight"
    train(TrainConfig(store=str(store), run=str(straight), steps=4, **options))
    log = [json.loads(x) for x in (final / "run/log.jsonl").read_text().splitlines()]
    expect = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == [r["loss"] for r in expect]  # the resume is exact


# --- encode -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(image_tree, tiny_vae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults-ref") / "ref.zarr"
    encode(job(image_tree, out, tiny_vae_dir))
    return out


def test_disk_full_or_a_kill_while_encoding(reference, image_tree, tiny_vae_dir, tmp_path):
    """Creating the store: a full disk, then a SIGKILL (a half-made store stays behind); then a
    full disk mid-shard; each time the same command picks up what is there and finishes."""
    out = tmp_path / "disk" / "s.zarr"
    cli = ["encode", str(image_tree), "--out", str(out), "--vae", str(tiny_vae_dir), *JOB_ARGS]
    cli += ["--workers", "0", "--device", "cpu"]
    creating, mid_shard = "*/s.zarr/latents/zarr*", "*/s.zarr/latents/c/2/*"
    steps = [
        {"cli": cli, "inject": {"when": creating, "action": MODE}},
        {"free": True},
        {"cli": cli, "inject": {"when": creating, "action": "kill"}},
        {"cli": cli, "inject": {"when": mid_shard, "action": MODE}},
        {"free": True},
        {"cli": cli},
    ]
    made, final = run_steps(tmp_path, steps, MODE)
    line = one_error(made[0])
    assert "out of space" in line and f"while creating the store {out}" in line
    assert "then re-run the same command to resume: latentdit encode" in line
    assert made[2]["rc"] == -9 and "s.zarr.creating" in made[2]["files"]  # killed mid-creation
    line = one_error(made[3])
    assert "half-made store" in made[3]["stderr"]  # the interrupted creation was redone
    assert "out of space" in line and f"while writing shard 2 of {out}" in line
    assert "complete shards are kept" in line
    shards = [
        f for f in made[3]["files"] if f.startswith(("s.zarr/latents/c/0/", "s.zarr/latents/c/1/"))
    ]
    assert len(shards) == 2
    assert made[5]["rc"] == 0, made[5]["stderr"]
    unchanged({k: made[3]["files"][k] for k in shards}, made[5]["files"], "s.zarr/")
    assert "s.zarr.creating" not in made[5]["files"] and "s.zarr.lock" not in made[5]["files"]
    assert _equal(store_contents(final / "s.zarr"), store_contents(reference))


# --- sampling ---------------------------------------------------------------------------------


def test_disk_full_while_writing_the_npz(tiny_vae_dir, tmp_path):
    ckpt = make_checkpoint(tmp_path / "run", tiny_vae_dir)
    out = tmp_path / "disk" / "out"
    options = ["--n", "4", "--batch-size", "2", "--steps", "2", "--npz", "--device", "cpu"]
    cli = ["sample", str(ckpt), "--out", str(out), *options]
    steps = [
        {"cli": cli, "inject": {"when": "*/out/.samples_*.npz.tmp-*", "action": MODE}},
        {"free": True},
        {"cli": cli},
    ]
    made, final = run_steps(tmp_path, steps, MODE)
    line = one_error(made[0])
    assert "out of space" in line and f"while writing {out}/samples_4x32x32x3.npz" in line
    assert "the finished images and parts there are kept" in line
    parts = [f for f in made[0]["files"] if f.startswith("out/npz_parts/")]
    assert len(parts) == 2 and not any(".tmp-" in f for f in made[0]["files"])
    assert made[2]["rc"] == 0, made[2]["stderr"]
    straight = tmp_path / "straight"
    options = {"n": 4, "batch_size": 2, "npz": True, "device": "cpu"}
    sample(
        SampleConfig(checkpoint=str(ckpt), out=str(straight), solve=SolveConfig(steps=2), **options)
    )
    name = "samples_4x32x32x3.npz"
    assert (final / "out" / name).read_bytes() == (straight / name).read_bytes()
