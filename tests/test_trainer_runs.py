"""Trainer runs: overfitting, torchrun ranks against one process, kill and resume, the CLI."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess

import pytest
import torch
from conftest import ROOT, write_store
from test_trainer import (
    CPU,
    TINY,
    _layout,
    runner,
)

from cli import app
from foundation.distributed import seed_everything, setup_distributed, teardown_distributed
from latent_store import LatentStore
from trainer.config import ConfigError, resolve_config
from trainer.data import build_batches
from trainer.normalization import normalization_from_store
from trainer.objective import DDPM, FlowMatching
from trainer.step import make_trainee, train_step
from trainer.train import build_model_for_store, train

# Parameters of our DiT for 4x32x32 latents and 1000 classes (1001 label rows, 4 output channels,
# fixed positions in a buffer), and the paper-equivalent count: the reference implementation also
# counts its frozen (1, T, D) position table as a parameter and predicts 8 channels (learn_sigma).


# --- the loop -------------------------------------------------------------------------------------


def tiny_options(store, run, **kw) -> dict:
    return {
        "store": str(store),
        "run": str(run),
        "model": "DiT-S/2",
        **TINY,
        "batch_size": 8,
        "warmup_steps": 0,
        "log_every": 1,
        "lr": 1e-3,
        **kw,
    }


def cli_args(options: dict) -> list[str]:
    return [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def read_log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_overfitting_a_tiny_store(tmp_path):
    """The real train step on one fixed batch (the whole store, the same noise) memorizes it."""
    store = LatentStore(write_store(tmp_path / "s.zarr", n=8))
    cfg = resolve_config(None, tiny_options(store.path, tmp_path / "run"))
    dist = setup_distributed("cpu")
    try:
        seed_everything(0, 0)
        trainee = make_trainee(build_model_for_store(cfg, store), cfg, dist)
        norm = normalization_from_store(store, cfg.normalization)
        data = build_batches(store, norm, _layout(8), mode="memory", seed=0, device=CPU)
        batches, objective = data.get(0, 0), FlowMatching()
        losses = [
            train_step(
                trainee, objective, batches, step=0, lr=3e-3, cfg=cfg, layout=_layout(8), device=CPU
            )[0].item()
            for _ in range(100)
        ]
    finally:
        teardown_distributed()
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_two_processes_match_one(tmp_path, python):
    """torchrun, 2 ranks on gloo, batch 4 each = 1 rank with batch 8: the same losses, also
    with DDP's overlap options and prefetching on the two ranks only.

    Only the order of floating-point sums differs (DDP averages gradients across ranks), so the
    losses agree to rtol 1e-5 over a few steps (measured: ~6e-8), not bitwise.
    """
    store = write_store(tmp_path / "s.zarr", n=32, variants=2)
    options = tiny_options(store, tmp_path / "two", steps=4, ckpt_every=100)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # tiny gradient buckets (several all-reduces overlapped with backward), gradients as bucket
    # views, the next batch prefetched: the two ranks' path of those options
    overlap = ["--ddp-bucket-mb", "0.002", "--grad-as-bucket-view", "--prefetch"]
    done = subprocess.run(
        [*command, str(ROOT / "cli.py"), "--", "train", *cli_args(options), *overlap],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    calls = []

    def sample_fn(ema, meta, step, run):  # the seam the sampler's grid writer plugs into
        calls.append((step, meta["step"], run.name, ema.training, type(ema).__name__))

    one_options = {**options, "run": str(tmp_path / "one"), "sample_every": 3}
    train(resolve_config(None, one_options), sample_fn=sample_fn)
    assert calls == [(3, 3, "one", False, "DiT"), (4, 4, "one", False, "DiT")]
    two, one = read_log(tmp_path / "two"), read_log(tmp_path / "one")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_kill_and_resume_is_exact(tmp_path, python):
    """SIGKILL a real training process after a checkpoint; re-running the command continues exactly."""
    store = write_store(tmp_path / "s.zarr", n=24, variants=2)
    options = tiny_options(store, tmp_path / "killed", steps=7, ckpt_every=3, keep_last=2)
    job = subprocess.Popen(
        [
            python,
            ROOT / "tests/jobs/pause_job.py",
            "step",
            "5",
            "train",
            *cli_args(options),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "job.err").open("w"),
        text=True,
    )
    try:
        line = next((s.strip() for s in job.stdout if not s.startswith("PID ")), "")
        assert line == "PAUSED step 5", (tmp_path / "job.err").read_text()[-2000:]
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    killed = tmp_path / "killed"
    assert [r["step"] for r in read_log(killed)] == [1, 2, 3, 4, 5]
    assert (killed / "checkpoints" / "latest").read_text().strip() == "0000003"
    result = runner.invoke(app, ["train", "--run", str(killed)])  # bare: the run's own config
    assert result.exit_code == 0, result.output
    assert "step 7 (resumed at step 3)" in result.output and "latentdit sample" in result.output
    train(resolve_config(None, {**options, "run": str(tmp_path / "straight")}))
    resumed, straight = read_log(killed), read_log(tmp_path / "straight")
    assert [r["step"] for r in resumed] == list(range(1, 8))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # bitwise
    for name in ("model.safetensors", "ema.safetensors"):
        a = (killed / "checkpoints" / "0000007" / name).read_bytes()
        assert a == (tmp_path / "straight" / "checkpoints" / "0000007" / name).read_bytes()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == [
        "0000006",
        "0000007",
        "latest",
    ]
    state = torch.load(killed / "checkpoints" / "0000006" / "state.pt", weights_only=True)
    assert state["data"] == {"epoch": 2, "step_in_epoch": 0} and state["step"] == 6
    saved = json.loads((killed / "config.json").read_text())
    assert saved["hidden_size"] == 32 and saved["steps"] == 7
    changed = runner.invoke(app, ["train", *cli_args({**options, "lr": 0.5})])
    assert changed.exit_code == 2 and "lr: 0.001 (run) vs 0.5 (now)" in changed.output


# --- the command line -----------------------------------------------------------------------------


def test_config_file_and_cli_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        'store = "a.zarr"\nrun = "r"\nmodel = "DiT-L/4"\nsteps = 7\nadam-betas = [0.9, 0.95]\n'
    )
    cfg = resolve_config(toml, {"steps": 9, "lr": None})
    assert (cfg.model, cfg.steps, cfg.adam_betas, cfg.lr) == ("DiT-L/4", 9, (0.9, 0.95), 1e-4)
    yml = tmp_path / "c.yaml"
    yml.write_text("store: a.zarr\nrun: r\ngrad_clip: null\n")
    assert resolve_config(yml).grad_clip is None
    yml.write_text("store: a.zarr\nlearning_rate: 3\n")
    with pytest.raises(ConfigError, match=r"unknown options \['learning_rate'\]"):
        resolve_config(yml)


def test_cli_with_a_config_file_and_every_non_default_path(tmp_path):
    """YAML config + CLI override; DDPM, stream data, vae_scaling, RoPE, QK-norm, accumulation."""
    store = write_store(tmp_path / "s.zarr", n=32, shard=8, chunk=4, variants=2)
    config = tmp_path / "run.yaml"
    options = tiny_options(store, tmp_path / "run", steps=5, objective="ddpm", data="stream")
    options.update(normalization="vae_scaling", pos_embed="rope", qk_norm=True, grad_accum=2)
    options.update(cosine_decay=True, ddpm_schedule="cosine", keep_last=None)
    config.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in options.items()))
    result = runner.invoke(app, ["train", "--config", str(config), "--steps", "2"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["steps"] == 2
    assert [r["step"] for r in read_log(run)] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in read_log(run))
    meta = json.loads((run / "checkpoints" / "0000002" / "meta.json").read_text())
    assert meta["objective"] == DDPM(schedule="cosine").to_meta()
    assert meta["normalization"]["kind"] == "vae_scaling"
    assert meta["model"]["config"]["pos_embed"] == "rope" and meta["model"]["config"]["qk_norm"]


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing_store", "no latent store here"),
        ("unknown_preset", "unknown model preset 'DiT-XXL/2'"),
        ("shape", "6x6 latents\\) does not fit --model DiT-S/4: latent size 6 is not divisible"),
        ("batch", "fewer than one global batch of 64"),
        ("config", "no such file"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, case, match):
    store = write_store(tmp_path / "s.zarr", n=16, size=6 if case == "shape" else 8)
    options = tiny_options(store, tmp_path / "run", steps=1)
    if case == "missing_store":
        options["store"] = str(tmp_path / "nope.zarr")
    if case == "unknown_preset":
        options["model"] = "DiT-XXL/2"
    if case == "shape":
        options["model"] = "DiT-S/4"
    if case == "batch":
        options["batch_size"] = 64
    extra = ["--config", str(tmp_path / "none.toml")] if case == "config" else []
    result = runner.invoke(app, ["train", *cli_args(options), *extra])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert re.search(match, result.output), result.output
