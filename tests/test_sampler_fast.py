"""Sampling at scale: torchrun ranks sharing one FID set, compiled and cast model functions, writes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from foundation.distributed import DistInfo
from sampler import outputs, ranks
from sampler.config import COMPILE_MODES, SampleConfig, SolveConfig
from sampler.errors import SamplerError
from sampler.inference import InferenceModel
from sampler.latents import make_latents
from sampler.plan import ImageNoise, plan_labels
from sampler.sample import _batches, sample
from sampler.writer import BatchWriter
from testkit import make_checkpoint, tiny_dit
from trainer.objective import FlowMatching

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, tiny_vae_dir):
    run = tmp_path_factory.mktemp("fast") / "run"
    make_checkpoint(run, tiny_vae_dir)
    return run


def test_each_rank_gets_a_contiguous_class_balanced_share():
    classes = [{"index": i, "id": f"n{i}"} for i in range(10)]
    labels = plan_labels(classes=classes, requested=(), n=1, fid_samples=1000, seed=0)
    batches = _batches(list(range(1000)), 64)
    shares = [
        ranks.share(
            batches, DistInfo(rank=r, world_size=3, local_rank=r, device=torch.device("cpu"))
        )
        for r in range(3)
    ]
    assert [b for s in shares for b in s] == batches  # every batch once, in rank order
    for s in shares:
        counts = np.bincount(labels[[i for b in s for i in b]], minlength=10)
        assert counts.max() - counts.min() <= 1, counts
    assert [len(s) for s in shares] == [5, 5, 6]


def test_two_ranks_under_torchrun_resume_to_the_npz_of_one_process(flow_run, tmp_path):
    """2 gloo ranks: rank 1 fails after its first part; the re-run finishes the same bytes."""
    one = sample(
        SampleConfig(
            checkpoint=flow_run, out=tmp_path / "one", fid_samples=12, npz=True, png=False,
            batch_size=2, solve=SolveConfig(steps=3, cfg=2.0),
        )
    )  # fmt: skip
    cut = tmp_path / "cut"
    args = ["sample", str(flow_run), "--out", str(cut), "--fid-samples", "12", "--npz", "--no-png"]
    args += ["--batch-size", "2", "--steps", "3", "--cfg", "2.0", "--device", "cpu"]
    job = [str(ROOT / "tests/jobs/sample_job.py"), "--fail-rank", "1", "--fail-after", "1"]
    failed = subprocess.run(
        [*TORCHRUN, *job, *args], env=ENV, capture_output=True, text=True, timeout=180
    )
    assert failed.returncode != 0 and "rank 1 fails after 1 parts" in failed.stderr
    parts = outputs.done_parts(cut)
    assert (6, 8) in parts and (8, 10) not in parts, parts  # rank 1's share starts at image 6
    assert not (cut / one.npz.name).exists()
    done = subprocess.run(
        [*TORCHRUN, str(ROOT / "cli.py"), "--", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    npz = cut / one.npz.name
    assert npz.read_bytes() == one.npz.read_bytes()
    assert (cut / "grid.png").read_bytes() == (tmp_path / "one" / "grid.png").read_bytes()
    assert not (cut / outputs.PARTS).exists()
    other = [*TORCHRUN, str(ROOT / "cli.py"), "--", *args, "--steps", "4"]  # rank 0's error on both
    refused = subprocess.run(other, env=ENV, capture_output=True, text=True, timeout=180)
    assert refused.returncode != 0
    assert refused.stderr.count("other settings (steps 3 there vs 4 now") == 2, refused.stderr[
        -2000:
    ]


def test_a_failed_write_stops_later_writes_and_reaches_the_caller():
    done = []

    def write(i):
        if i == 1:
            raise OSError("disk full")
        done.append(i)

    with pytest.raises(OSError, match="disk full"), BatchWriter() as writer:
        for i in range(4):
            writer.submit(write, i)
    assert done == [0]


def latents(net, solve: SolveConfig, precision="fp32", n=3):
    return make_latents(
        net, FlowMatching(), torch.arange(n) % 3, ImageNoise(0, range(n)), solve,
        latent_shape=(4, 4, 4), device=torch.device("cpu"), precision=precision,
    )  # fmt: skip


def close(z, reference, scale=3e-5) -> bool:
    return bool((z - reference).abs().max() <= scale * reference.abs().max())


def test_compiled_model_function_matches_eager_and_never_recompiles_across_steps():
    """Time is a (B,) tensor: one graph for the guided 2B rows over every step, one more for the
    B rows outside the guidance interval, and outputs equal to eager within float rounding
    (inductor fuses and reorders fp32 sums: measured ~8e-6 of the output scale)."""
    from torch._dynamo.utils import counters

    model = tiny_dit().eval()
    torch._dynamo.reset()
    counters.clear()
    compiled = InferenceModel(model, compile="default")
    guided = SolveConfig(sampler="heun", steps=4, cfg=3.0)
    # config.patch, not monkeypatch: monkeypatch's undo deletes the option from torch's config
    # module, and every later recompile in the process then fails on the missing attribute
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert close(latents(compiled, guided), latents(model, guided))
    assert counters["stats"]["unique_graphs"] == 1  # 8 model calls, one graph
    interval = SolveConfig(sampler="heun", steps=4, cfg=3.0, cfg_interval=(0.0, 0.6))
    assert close(latents(compiled, interval), latents(model, interval))
    assert counters["stats"]["unique_graphs"] == 2  # + the B-row shape, for all unguided calls
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", [None, *COMPILE_MODES])
def test_every_cuda_graph_mode_clones_outputs_and_marks_steps(mode):
    """Under a mode that replays CUDA graphs ("max-autotune" as well as "reduce-overhead") a
    replay overwrites the last outputs, which Heun keeps across calls: the model function must
    clone them and mark each call a new step, exactly for the modes torch records graphs in."""
    from foundation.compile import uses_cuda_graphs

    net = InferenceModel(tiny_dit().eval(), compile=mode)
    assert net.cuda_graphs == (mode is not None and uses_cuda_graphs(mode))
    assert InferenceModel(tiny_dit().eval(), compile="max-autotune").cuda_graphs


def test_cast_weights_stay_within_bf16_tolerance_of_autocast():
    model = tiny_dit().eval()
    solve = SolveConfig(sampler="euler", steps=3, cfg=2.0)
    reference = latents(model, solve, precision="bf16")
    cast = InferenceModel(tiny_dit().eval(), weights_dtype=torch.bfloat16)
    assert next(cast.model.parameters()).dtype == torch.bfloat16
    z = latents(cast, solve, precision="bf16")
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, reference, atol=0.05, rtol=0.02)
    fp32 = latents(model, solve)
    assert (z - fp32).abs().max() < 0.1


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"compile": "fast"}, "--compile 'fast' is not one of default, reduce-overhead"),
        ({"cast_weights": True, "precision": "fp32"}, "--cast-weights casts to the --precision"),
    ],
)
def test_bad_speed_options(tmp_path, kw, match):
    with pytest.raises(SamplerError, match=match):
        SampleConfig(checkpoint=tmp_path, out=tmp_path, **kw)
