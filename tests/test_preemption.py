"""Real signals to real processes: train, sample and encode stop cleanly and resume exactly.

Each job runs under tests/jobs/pause_job.py, which holds it at a known point (after a training
step, a sample part, a store shard) until the signal the test sends has arrived.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, make_checkpoint, store_contents, write_store
from test_pipeline import JOB_ARGS, job
from test_trainer_runs import cli_args, read_log, tiny_options

from foundation.preemption import REPEAT_WINDOW_S, Preempted, StopSignals
from latent_store import LatentStore
from pipeline.encode import encode
from sampler import outputs
from sampler.config import SampleConfig, SolveConfig
from sampler.sample import sample
from trainer.config import resolve_config
from trainer.cost import COST_CLOCK
from trainer.train import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
JOB = [sys.executable, str(ROOT / "tests/jobs/pause_job.py")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# what docs/multinode.md tells torchrun users: forward SLURM's SIGUSR1 too
TORCHRUN += ["--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1"]
# 9 steps, records at 4 and 8 (and 9), checkpoints at 4 and 8: a signal at step 6 falls inside
# both intervals, so the resumed run must carry the loss sum of steps 5-6 into record 8
TRAIN = {"steps": 9, "log_every": 4, "ckpt_every": 4, "keep_last": 5, "device": "cpu"}


class Job:
    """A job process under pause_job.py: its lines on stdout, its stderr in a file."""

    def __init__(self, command: list, tmp_path: Path, name: str, **popen) -> None:
        self.err = tmp_path / f"{name}.err"
        self.proc = subprocess.Popen(
            [str(a) for a in command], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
            stderr=self.err.open("w"), text=True, **popen,
        )  # fmt: skip
        self.pids: list[int] = []

    def wait_for(self, prefix: str) -> str:
        """The first stdout line starting with `prefix` (PID lines are collected on the way)."""
        for line in self.proc.stdout:
            # the ranks share the pipe: read every "PID <rank> <pid>" a line holds
            self.pids += [int(m.group(1)) for m in re.finditer(r"PID \d+ (\d+)", line)]
            if prefix in line:
                return line[line.index(prefix) :].strip()
        raise AssertionError(f"no {prefix!r} line; stderr: {self.stderr()[-3000:]}")

    def finish(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def stderr(self) -> str:
        return self.err.read_text()


def log_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_log(run)]


def same_checkpoint(a: Path, b: Path) -> bool:
    names = ("model.safetensors", "ema.safetensors")
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("preempt") / "s.zarr", n=24, variants=2)


@pytest.fixture(scope="module")
def straight(store, tmp_path_factory) -> Path:
    """The uninterrupted run, in this process."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(resolve_config(None, tiny_options(store, run, **TRAIN)))
    return run


def paused_training(store: Path, tmp_path: Path, point: str) -> tuple[Path, dict, Job]:
    """(run, options, the job) of a training run held at `point` 6 (see pause_job.py)."""
    run = tmp_path / "run"
    options = tiny_options(store, run, **TRAIN)
    job = Job([*JOB, point, 6, "train", *cli_args(options)], tmp_path, "train")
    job.wait_for("PAUSED")
    return run, options, job


def test_sigterm_mid_interval_checkpoints_the_step_and_resumes_bit_for_bit(
    store, straight, tmp_path
):
    run, _, job = paused_training(store, tmp_path, "step")
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish() == 128 + signal.SIGTERM, job.stderr()[-3000:]
    lines = [line for line in job.stderr().splitlines() if "stopped after step" in line]
    assert len(lines) == 1 and "SIGTERM: stopped after step 6; checkpoint" in lines[0]
    assert "Traceback" not in job.stderr()
    assert (run / "checkpoints" / "latest").read_text().strip() == "0000006"
    state = torch.load(run / "checkpoints" / "0000006" / "state.pt", weights_only=True)
    assert state["step"] == 6 and state["log"]["steps"] == 2  # steps 5 and 6 of record 8
    done = subprocess.run(
        [sys.executable, ROOT / "cli.py", "train", "--run", run], env=ENV, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "resumed at step 6" in done.stdout, done.stderr[-3000:]
    assert log_losses(run) == log_losses(straight)  # bitwise, record 8 included
    assert same_checkpoint(run / "checkpoints" / "0000009", straight / "checkpoints" / "0000009")


def test_a_second_signal_aborts_the_write_and_keeps_the_previous_checkpoint(
    store, straight, tmp_path
):
    run, options, job = paused_training(store, tmp_path, "save")
    previous = run / "checkpoints" / "0000004"
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    job.proc.send_signal(signal.SIGTERM)
    job.wait_for("WRITING")  # the checkpoint of step 6 is half written
    time.sleep(REPEAT_WINDOW_S + 0.2)  # a deliberate second signal, not the first one again
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish() == -signal.SIGTERM, job.stderr()[-3000:]
    assert "SIGTERM again: aborting now" in job.stderr()
    assert (run / "checkpoints" / "latest").read_text().strip() == "0000004"
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    assert not (run / "checkpoints" / "0000006").exists()
    train(resolve_config(None, {**options, "run": str(run)}))  # resumes from step 4
    assert log_losses(run) == log_losses(straight)
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the next save removed the half
    assert same_checkpoint(run / "checkpoints" / "0000009", straight / "checkpoints" / "0000009")


def test_sigusr1_to_two_ranks_under_torchrun_as_slurm_sends_it(store, tmp_path):
    """SLURM signals every process of a step, and torchrun forwards what it gets: each rank
    receives SIGUSR1 twice at once; both stop after the same step, which rank 0 checkpoints:
    the step after the one in which the signal came (the ranks' check overlaps the next step)."""
    run, straight = tmp_path / "run", tmp_path / "straight"
    options = tiny_options(store, run, **TRAIN)
    job = Job([*TORCHRUN, JOB[-1], "--", "step", 6, "train", *cli_args(options)], tmp_path, "two")
    job.wait_for("PAUSED")
    while len(job.pids) < 2:
        job.wait_for("PID")
    for pid in [job.proc.pid, *job.pids]:  # the agent (which forwards it) and both ranks
        os.kill(pid, signal.SIGUSR1)
    job.finish()  # torchrun's own exit code: it reports the signal it got as a failure
    stops = [line for line in job.stderr().splitlines() if "SIGUSR1: stopped after" in line]
    assert len(stops) == 1 and "stopped after step 7" in stops[0], job.stderr()[-3000:]
    assert "aborting" not in job.stderr()
    assert (run / "checkpoints" / "latest").read_text().strip() == "0000007"
    for args in (["--run", run], cli_args({**options, "run": straight})):
        done = subprocess.run(
            [*TORCHRUN, ROOT / "cli.py", "--", "train", *args], env=ENV, capture_output=True,
            text=True, timeout=180,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    assert log_losses(run) == log_losses(straight)
    assert same_checkpoint(run / "checkpoints" / "0000009", straight / "checkpoints" / "0000009")


def test_sample_writes_the_batch_in_hand_and_resumes_to_the_same_npz(tmp_path, tiny_vae_dir):
    run = tmp_path / "run"
    make_checkpoint(run, tiny_vae_dir)
    options = ["--class", "1", "--n", "9", "--npz", "--no-png", "--steps", "3", "--cfg", "2"]
    options += ["--batch-size", "2", "--device", "cpu"]
    out = tmp_path / "cut"
    job = Job([*JOB, "solve", 3, "sample", run, "--out", out, *options], tmp_path, "sample")
    job.wait_for("PAUSED")
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish() == 128 + signal.SIGTERM, job.stderr()[-3000:]
    stops = [line for line in job.stderr().splitlines() if "SIGTERM: stopped" in line]
    assert len(stops) == 1 and "stopped with 6 of 9 images written" in stops[0], stops
    assert outputs.done_parts(out) == [(0, 2), (2, 4), (4, 6)]  # the third was in hand
    assert (out / outputs.MANIFEST).is_file() and not list(out.glob("*.npz"))
    cfg = SampleConfig(checkpoint=run, out=out, classes=("1",), n=9, npz=True, png=False,
                       batch_size=2, device="cpu", solve=SolveConfig(steps=3, cfg=2.0))  # fmt: skip
    resumed = sample(cfg)
    whole = sample(SampleConfig(**{**cfg.__dict__, "out": tmp_path / "whole"}))
    assert (resumed.made, whole.made) == (3, 9)
    assert resumed.npz.read_bytes() == whole.npz.read_bytes()


def test_encode_stops_between_shards_on_ctrl_c_and_resumes_identically(
    image_tree, tiny_vae_dir, tmp_path
):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it: the decode worker
    leaves stopping to the main process, which ends the shard write in flight and exits 130."""
    out = tmp_path / "cut.zarr"
    args = ["encode", image_tree, "--out", out, "--vae", tiny_vae_dir, *JOB_ARGS]
    command = [*JOB, "shard", 1, *args, "--workers", "1", "--device", "cpu"]
    running = Job(command, tmp_path, "encode", start_new_session=True)
    running.wait_for("PAUSED")
    os.killpg(running.proc.pid, signal.SIGINT)
    assert running.finish() == 128 + signal.SIGINT, running.stderr()[-3000:]
    assert "Traceback" not in running.stderr() and "SIGINT: stopped with" in running.stderr()
    store = LatentStore(out)
    assert 0 < store.spec.num_shards - len(store.missing_shards()) < store.spec.num_shards
    encode(job(image_tree, out, tiny_vae_dir))  # the same job, resumed
    encode(job(image_tree, tmp_path / "whole.zarr", tiny_vae_dir))
    a, b = store_contents(out), store_contents(tmp_path / "whole.zarr")
    assert a["attrs"] == b["attrs"]
    assert all(np.array_equal(a[k], b[k]) for k in a if k != "attrs")


def test_an_interrupted_interval_carries_the_loss_terms_in_process(store, tmp_path, monkeypatch):
    """DDPM with a learned variance logs loss terms; a stop after step 3 of a 4-step record
    interval resumes to the record of an uninterrupted run, every term bit for bit."""
    options = {**TRAIN, "steps": 5, "objective": "ddpm", "learn_sigma": True}
    straight = tmp_path / "straight"
    train(resolve_config(None, tiny_options(store, straight, **options)))
    calls = []

    def stop_after_three(self, *, overlap=False):
        calls.append(1)
        return signal.SIGTERM if len(calls) == 3 else None

    run = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(StopSignals, "agreed", stop_after_three)
        with pytest.raises(Preempted) as stopped:
            train(resolve_config(None, tiny_options(store, run, **options)))
    assert stopped.value.code == 128 + signal.SIGTERM and "after step 3" in stopped.value.message
    train(resolve_config(None, tiny_options(store, run, **options)))
    records = read_log(run)
    assert records == [
        r | {k: records[i][k] for k in TIMING} for i, r in enumerate(read_log(straight))
    ]
    assert any(k.startswith("loss_") for k in records[0]), records[0]


TIMING = ("steps_per_s", "images_per_s", "mfu", "data_fraction", *COST_CLOCK)  # wall-clock figures
