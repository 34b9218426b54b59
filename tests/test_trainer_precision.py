"""--bf16-weights (a bf16 compute copy, fp32 masters) and selective activation checkpointing keep
what is learned: the same losses, checkpoints and resumes, one rank or two, on the CPU."""

from __future__ import annotations

import itertools
import os
import subprocess

import pytest
import torch
from conftest import ROOT, write_store
from test_trainer import tiny_model
from test_trainer_runs import cli_args, read_log, tiny_options

from trainer.config import ConfigError, resolve_config
from trainer.metrics import saved_activation_bytes
from trainer.train import train

BF16 = {"precision": "bf16", "bf16_weights": True}
WEIGHTS = ("model.safetensors", "ema.safetensors")


def _run(tmp_path, store, name: str, **kw) -> list[dict]:
    train(resolve_config(None, tiny_options(store, tmp_path / name, **kw)))
    return read_log(tmp_path / name)


def _weights(run, step: int = 4) -> list[bytes]:
    return [(run / "checkpoints" / f"{step:07d}" / name).read_bytes() for name in WEIGHTS]


def test_bf16_weights_give_the_autocast_step_bit_for_bit(tmp_path):
    """bf16 autocast with fp32 weights vs --bf16-weights, two micro-batches per step.

    Tolerance: none. Autocast rounds each fp32 weight to bf16 per call, the copy holds that same
    rounding; both widen each bf16 gradient to fp32 and sum micro-batches and ranks in fp32 in
    the same order; AdamW, clipping and the EMA run on the same fp32 masters. So the losses, the
    grad norms and the saved masters and EMA are identical, and only a bf16-vs-fp32 run differs.
    """
    store = write_store(tmp_path / "s.zarr", n=24, variants=2)
    kw = {"steps": 4, "grad_accum": 2, "ckpt_every": 4}
    autocast = _run(tmp_path, store, "autocast", precision="bf16", **kw)
    copy = _run(tmp_path, store, "copy", **BF16, **kw)
    assert [(r["loss"], r["grad_norm"]) for r in copy] == [
        (r["loss"], r["grad_norm"]) for r in autocast
    ]
    assert _weights(tmp_path / "copy") == _weights(tmp_path / "autocast")
    fp32 = _run(tmp_path, store, "fp32", precision="fp32", **kw)
    assert [r["loss"] for r in fp32] != [r["loss"] for r in copy]  # bf16 compute did happen
    for a, b in zip(fp32, copy, strict=True):  # bf16 has 8 mantissa bits: 2^-8 ~ 4e-3
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2)


def test_bf16_weights_resume_exactly_and_across_the_option(tmp_path):
    """Stopped at step 2 and resumed (with the option, or switching it either way): the losses
    and final weights of an uninterrupted run, bit for bit (checkpoints hold the fp32 masters)."""
    store = write_store(tmp_path / "s.zarr", n=24, variants=2)
    kw = {"precision": "bf16", "ckpt_every": 2}
    straight = _run(tmp_path, store, "straight", steps=4, bf16_weights=True, **kw)
    for name, first, then in [("same", True, True), ("on", False, True), ("off", True, False)]:
        _run(tmp_path, store, name, steps=2, bf16_weights=first, **kw)
        resumed = _run(tmp_path, store, name, steps=4, bf16_weights=then, **kw)
        assert [r["loss"] for r in resumed] == [r["loss"] for r in straight], name
        assert _weights(tmp_path / name) == _weights(tmp_path / "straight"), name


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"precision": "fp32", "bf16_weights": True}, "--bf16-weights needs bf16 compute"),
        ({"precision": "auto", "bf16_weights": True}, "--precision auto is fp32 on cpu"),
        ({"checkpoint_blocks": 3}, r"--checkpoint-blocks must be in \[0, 2\]"),
        ({"checkpoint_blocks": -1}, r"--checkpoint-blocks must be in \[0, 2\]"),
        ({"checkpoint_blocks": 1, "grad_checkpointing": True}, "give one"),
        ({"compile_mode": "fast"}, "--compile-mode 'fast' is not one of default"),
    ],
)
def test_bad_precision_and_recompute_options(tmp_path, kw, match):
    store = write_store(tmp_path / "s.zarr", n=8)
    with pytest.raises(ConfigError, match=match):
        train(resolve_config(None, tiny_options(store, tmp_path / "run", steps=1, **kw)))


def test_two_processes_with_bf16_weights_match_autocast_and_one(tmp_path, python):
    """torchrun, 2 gloo ranks: --bf16-weights (the fp32 all-reduce comm hook, micro-batches
    accumulated into the masters) = bf16 autocast on 2 ranks bit for bit, and = 1 rank within
    bf16 rounding: each rank's bf16 GEMMs sum half the rows before rounding, so the gradients
    differ in bf16's last bits (grad norm measured 7e-5 apart; losses 1e-7)."""
    store = write_store(tmp_path / "s.zarr", n=32, variants=2)
    common = {"steps": 3, "grad_accum": 2, "ckpt_every": 100}
    command = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for name, extra in [("two", ["--bf16-weights"]), ("two_autocast", [])]:
        options = tiny_options(store, tmp_path / name, precision="bf16", **common)
        done = subprocess.run(
            [*command, str(ROOT / "cli.py"), "--", "train", *cli_args(options), *extra],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    one = _run(tmp_path, store, "one", **BF16, **common)
    two, autocast = read_log(tmp_path / "two"), read_log(tmp_path / "two_autocast")
    assert [r["step"] for r in two] == [1, 2, 3]
    assert [(r["loss"], r["grad_norm"]) for r in two] == [
        (r["loss"], r["grad_norm"]) for r in autocast
    ]
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


# --- selective activation checkpointing -----------------------------------------------------------


def test_checkpoint_blocks_keep_the_gradients_and_save_activation_memory():
    """Recomputing the first N of 4 blocks: the same gradients, and the bytes autograd keeps
    fall with N (measured with saved_tensors_hooks: no CUDA allocator on the CPU)."""
    x, t, y = (
        torch.randn(4, 4, 8, 8),
        torch.tensor([3.0, 7.0, 1.0, 9.0]),
        torch.tensor([0, 2, 1, 0]),
    )
    model = tiny_model(depth=4)
    saved, grads = [], []
    for n in range(5):
        model.checkpoint_blocks = n
        saved.append(saved_activation_bytes(model, x, t, y))
        model.zero_grad(set_to_none=True)
        model(x, t, y).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])
    assert saved == sorted(saved, reverse=True) and len(set(saved)) == 5, saved
    per_block = [a - b for a, b in itertools.pairwise(saved)]
    assert max(per_block) - min(per_block) <= 0.05 * max(per_block), per_block  # alike blocks
    assert saved[4] < 0.3 * saved[0], saved


def test_checkpoint_blocks_in_training_and_on_resume(tmp_path):
    """--checkpoint-blocks 1 trains as no recomputation does (within float rounding), and a run
    may change its recomputation on resume (--grad-checkpointing too, though the model config
    in the checkpoint records it)."""
    store = write_store(tmp_path / "s.zarr", n=24, variants=2)
    base = _run(tmp_path, store, "base", steps=4, ckpt_every=2)
    some = _run(tmp_path, store, "some", steps=4, checkpoint_blocks=1)
    for a, b in zip(base, some, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    _run(tmp_path, store, "switch", steps=2, ckpt_every=2, grad_checkpointing=True)
    switched = _run(tmp_path, store, "switch", steps=4, ckpt_every=2, checkpoint_blocks=0)
    for a, b in zip(base, switched, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
