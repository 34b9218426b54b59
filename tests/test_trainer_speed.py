"""The trainer's speed options keep what is learned: prefetching, SDPA backends, DDP buckets and
torch.compile (each block in place, or the DDP-wrapped model), on the CPU in fp32."""

from __future__ import annotations

import pytest
import torch
from conftest import write_store
from test_trainer_runs import read_log, tiny_options

from foundation.compile import uses_cuda_graphs
from latent_store import LatentStore
from trainer.checkpoint import load_checkpoint
from trainer.config import resolve_config
from trainer.data import BatchLayout, build_batches
from trainer.normalization import normalization_from_store
from trainer.prefetch import Prefetcher
from trainer.train import train

CPU = torch.device("cpu")


def _run(tmp_path, store, name: str, **kw) -> list[dict]:
    train(resolve_config(None, tiny_options(store, tmp_path / name, **kw)))
    return read_log(tmp_path / name)


def test_prefetcher_gives_the_batches_of_its_source(tmp_path):
    """Made ahead (across an epoch's end too) or asked for out of turn: the source's batches."""
    store = LatentStore(write_store(tmp_path / "s.zarr", n=24, variants=2))
    norm = normalization_from_store(store, "channel_stats")
    layout = BatchLayout(batch_size=8, grad_accum=2, rank=0, world_size=1)
    source = build_batches(store, norm, layout, mode="memory", seed=0, device=CPU)
    data = Prefetcher(source, CPU)
    positions = [(0, 0), (0, 1), (0, 2), (1, 0), (0, 1), (2, 2)]
    for i, (epoch, step) in enumerate(positions):
        got = data.get(epoch, step)
        want = source.get(epoch, step)
        assert all(
            g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in g)
            for g, w in zip(got, want, strict=True)
        )
        if i % 2 == 0:
            data.prefetch(epoch, step + 1)


def test_step_options_keep_the_losses(tmp_path):
    """Prefetching and DDP's bucket options give the eager run's losses bit for bit; the math
    SDPA backend within float rounding."""
    store = write_store(tmp_path / "s.zarr", n=24, variants=2)
    base = _run(tmp_path, store, "base", steps=4)
    same = _run(
        tmp_path, store, "same", steps=4, prefetch=True, ddp_bucket_mb=0.001,
        grad_as_bucket_view=True,
    )  # fmt: skip
    assert [r["loss"] for r in same] == [r["loss"] for r in base]
    math_sdpa = _run(tmp_path, store, "math", steps=4, attention="math")
    for a, b in zip(base, math_sdpa, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compiled_step_matches_eager_and_resumes_exactly(tmp_path, scope):
    """--compile: the eager losses within float rounding, checkpoints with the eager state-dict
    keys (unwrapped), and a resumed compiled run equal bit for bit to an uninterrupted one."""
    store = write_store(tmp_path / "s.zarr", n=24, variants=2)
    eager = _run(tmp_path, store, "eager", steps=4, ckpt_every=2)
    kw = dict(compile=True, compile_scope=scope, ckpt_every=2)
    straight = _run(tmp_path, store, "straight", steps=4, **kw)
    for a, b in zip(eager, straight, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    _run(tmp_path, store, "resumed", steps=2, **kw)
    resumed = _run(tmp_path, store, "resumed", steps=4, **kw)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    ckpt = "checkpoints/0000004/model.safetensors"
    assert (tmp_path / "resumed" / ckpt).read_bytes() == (tmp_path / "straight" / ckpt).read_bytes()
    keys = load_checkpoint(tmp_path / "eager").model_state.keys()
    assert load_checkpoint(tmp_path / "straight").model_state.keys() == keys


@pytest.mark.parametrize(
    ("scope", "mode"),
    [
        ("blocks", "reduce-overhead"),
        ("blocks", "max-autotune"),
        ("model", "max-autotune-no-cudagraphs"),
    ],
)
def test_compile_modes_match_eager(tmp_path, monkeypatch, scope, mode):
    """--compile-mode, passed to torch.compile for either scope: the eager losses within float
    rounding. On the CPU reduce-overhead makes no CUDA graphs (inductor skips them off CUDA), so
    this checks that the mode runs, and that each step is marked a new CUDA-graph step exactly in
    the modes that replay graphs (max-autotune too), not the graphs themselves."""
    store = write_store(tmp_path / "s.zarr", n=24, variants=2)
    eager = _run(tmp_path, store, "eager", steps=2)
    marks, mark = [], torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(
        torch.compiler, "cudagraph_mark_step_begin", lambda: (marks.append(1), mark())[1]
    )
    torch.compiler.reset()  # compile in this mode, not reuse another test's graphs of the blocks
    compiled = _run(
        tmp_path, store, mode, steps=2, compile=True, compile_scope=scope, compile_mode=mode
    )
    torch.compiler.reset()
    for a, b in zip(eager, compiled, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert len(marks) == (2 if uses_cuda_graphs(mode) else 0)
