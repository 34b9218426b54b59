"""A damaged or busy run folder, as a user meets it: `latentdit train --run RUN` in a real process.

Each case damages a copy of a 4-step run (checkpoints 0000002 and 0000004), records the digest of
every file, and resumes it to step 6. A damage a crash or a full disk leaves (a `latest` pointer
that is empty, dangling or garbled, a torn last log line, a checkpoint file cut short) falls back
to the newest intact checkpoint, says so in one line, and continues exactly as an uninterrupted
run; every file written before is still there, byte for byte (a damaged checkpoint set aside as
STEP.damaged). What no crash leaves (a hostile pickle, a garbled line inside the log, every
checkpoint damaged, a lock held on another host) is refused in one line, exit 2, nothing changed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runs import ENV, digests, error_line, run_cli
from conftest import ROOT, TINY_DIT, write_store

from trainer.config import TrainConfig
from trainer.train import train

CKPT = Path("checkpoints")
OPTIONS = {**TINY_DIT, "batch_size": 8, "warmup_steps": 0, "lr": 2e-3, "log_every": 1}
OPTIONS |= {"ckpt_every": 2, "device": "cpu"}


def losses(run: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The 4-step run each case damages a copy of, and the same run trained straight to 6."""
    root = tmp_path_factory.mktemp("faults-run")
    store = write_store(root / "s.zarr", n=24)
    base = {**OPTIONS, "store": str(store)}
    train(TrainConfig(**base, run=str(root / "run"), steps=4))
    train(TrainConfig(**base, run=str(root / "straight"), steps=6))
    return {"run": root / "run", "straight": root / "straight"}


class Evil:
    """A pickle that would run a command if it were ever unpickled unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cut(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _lock(run: Path, **holder) -> None:
    found = {"host": socket.gethostname(), "pid": 1, "started": None, "boot": None}
    found |= {"since": "2026-01-01 00:00:00 UTC", "command": "latentdit train", "token": "x"}
    (run / ".lock").write_text(json.dumps({**found, **holder}))


def _dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


# name: (damage(run), step resumed from or None for a refusal, fragment of the line said)
CASES = {
    "latest empty": (lambda r: (r / CKPT / "latest").write_text(""), 4, "latest is empty"),
    "latest missing": (lambda r: (r / CKPT / "latest").unlink(), 4, "latest is missing"),
    "latest dangling": (
        lambda r: (r / CKPT / "latest").write_text("0000009\n"),
        4,
        "names 0000009, which does not exist",
    ),
    "latest garbled": (
        lambda r: (r / CKPT / "latest").write_bytes(b"\x00\xff\xfe\n../x"),
        4,
        "latest is garbled",
    ),
    "torn last log line": (
        lambda r: (r / "log.jsonl").open("a").write('{"step": 5, "loss": 0.9'),
        4,
        "dropped its torn last line",
    ),
    "state.pt cut short": (
        lambda r: _cut(r / CKPT / "0000004/state.pt"),
        2,
        "0000004 is damaged: state.pt is cut short",
    ),
    "model weights cut short": (
        lambda r: _cut(r / CKPT / "0000004/model.safetensors"),
        2,
        "model.safetensors is cut short",
    ),
    "ema weights emptied": (
        lambda r: _cut(r / CKPT / "0000004/ema.safetensors", 0),
        2,
        "ema.safetensors is cut short",
    ),
    "meta.json cut short": (
        lambda r: _cut(r / CKPT / "0000004/meta.json"),
        2,
        "meta.json is unreadable",
    ),
    "stale lock of a dead process": (
        lambda r: _lock(r, pid=_dead_pid()),
        4,
        "taking over the stale lock",
    ),
    "every checkpoint cut short": (
        lambda r: [_cut(r / CKPT / s / "state.pt") for s in ("0000002", "0000004")],
        None,
        "no intact checkpoint (",
    ),
    "state.pt a hostile pickle": (
        lambda r: (r / CKPT / "0000004/state.pt").write_bytes(pickle.dumps(Evil(r / "pwned"))),
        None,
        "state.pt holds a pickle outside the allowed types",
    ),
    "garbled log line inside": (
        lambda r: (r / "log.jsonl").write_text(
            "".join(
                "garbage\n" if i == 1 else line + "\n"
                for i, line in enumerate((r / "log.jsonl").read_text().splitlines())
            )
        ),
        None,
        "log.jsonl: line 2 is not a log record",
    ),
    "locked on another host": (
        lambda r: _lock(r, host="node-17", pid=4242),
        None,
        "is in use by pid 4242 on node-17 since 2026-01-01 00:00:00 UTC",
    ),
}


# run as real processes too (each costs a python start); the others run in this process
REAL = {"state.pt cut short", "state.pt a hostile pickle", "latest dangling"}
TABLE = [(c, False) for c in sorted(CASES)] + [(c, True) for c in sorted(REAL)]


@pytest.mark.parametrize(("case", "real"), TABLE, ids=[f"{c}{' (process)' * r}" for c, r in TABLE])
def test_a_damaged_run_dir(runs, tmp_path, case, real):
    damage, resumed, said = CASES[case]
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    damage(run)
    before = digests(run)
    log_before = (run / "log.jsonl").read_text().splitlines()
    done = run_cli("train", "--run", run, "--steps", "6", real=real)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    assert not (run / "pwned").exists()  # nothing in a hostile file ever runs
    if resumed is None:
        assert said in error_line(done)
        assert digests(run) == before  # a refusal changes nothing
        return
    assert done.returncode == 0, done.stderr[-3000:]
    said_lines = [line for line in done.stderr.splitlines() if said in line]
    assert len(said_lines) == 1, done.stderr[-3000:]
    assert f"step 6 (resumed at step {resumed})" in done.stdout, done.stdout
    after = digests(run)
    for path, digest in before.items():
        if path in ("log.jsonl", "config.json", "checkpoints/latest", ".lock"):
            continue
        kept = path.replace("0000004/", "0000004.damaged/") if resumed == 2 else path
        assert after.get(kept) == digest, f"{path} changed or lost"
    log_after = (run / "log.jsonl").read_text().splitlines()
    kept_lines = [
        line for line in log_before if line.endswith("}") and json.loads(line)["step"] <= resumed
    ]
    assert log_after[: len(kept_lines)] == kept_lines
    assert losses(run) == losses(runs["straight"])  # the resume is exact


def test_a_second_process_is_refused_while_the_first_runs(runs, tmp_path):
    """A real second `train` on a run another one is training: refused naming the holder; once
    the first is killed, its lock is stale and the run resumes."""
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    first = subprocess.Popen(
        [sys.executable, ROOT / "tests/jobs/pause_job.py", "step", "5",
         "train", "--run", str(run), "--steps", "6"],
        env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        lines = iter(first.stdout.readline, "")
        assert any(line.startswith("PAUSED") for line in lines)  # after step 5, lock held
        before = digests(run)
        second = run_cli("train", "--run", run, "--steps", "6")
        line = error_line(second)
        assert f"run {run} is in use by pid {first.pid} on {socket.gethostname()} since" in line
        assert f"remove {run / '.lock'}" in line
        assert digests(run) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = run_cli("train", "--run", run, "--steps", "6")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "taking over the stale lock" in third.stderr and "resumed at step 4" in third.stdout
    assert not (run / ".lock").exists()
    assert losses(run) == losses(runs["straight"])


def test_a_lock_being_taken_right_now_is_respected(runs, tmp_path):
    """An empty lock file younger than a few seconds: its taker is writing it; refused. An old
    one (a process killed between creating and writing it) is stale and taken over."""
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    (run / ".lock").write_text("")
    assert "is taking its lock" in error_line(run_cli("train", "--run", run, "--steps", "4"))
    old = time.time() - 3600
    os.utime(run / ".lock", (old, old))
    done = run_cli("train", "--run", run, "--steps", "4")
    assert done.returncode == 0 and "an unreadable lock file" in done.stderr, done.stderr[-3000:]
