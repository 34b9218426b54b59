"""Where a training step's time goes: the real `train_step` under torch.profiler, by kernel class.

    python bench/profile_train.py [--model DiT-XL/2] [--batch-size 128] [--compile]
                                  [--compile-scope blocks] [--attention flash] [--steps 3]

Prints one JSON object: per class (gemm, attention, layer_norm (with the adaLN modulation fused
into it when compiled), elementwise, cast, optimizer, ema, grad_clip, all_reduce, ...) the device
seconds per step and their share; TFLOP/s for GEMMs and attention (FLOPs of one forward and
backward counted by torch.utils.flop_counter), GB/s for the optimizer, EMA and clipping (bytes per
parameter: AdamW 28, EMA 12, clipping 12); how busy the device was over the steps' timeline (the
gaps between kernels); and, on CUDA, the host synchronizations per step (torch's sync debug
mode: a step that never waits for the device has none). The step is the trainer's own
(`trainer.step.train_step`), on random latents of the ImageNet-256 shape in a real store.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import bench_store
from kernel_profile import flop_counts, profile_region, summarize

from foundation.compile import compile_cache
from foundation.distributed import setup_distributed, teardown_distributed
from latent_store import LatentStore
from trainer.config import (
    ATTENTION_BACKENDS,
    COMPILE_MODES,
    COMPILE_SCOPES,
    PRECISIONS,
    resolve_config,
)
from trainer.data import BatchLayout, build_batches
from trainer.metrics import peak_flops
from trainer.model import DIT_PRESETS
from trainer.normalization import normalization_from_store
from trainer.objective import FlowMatching
from trainer.step import lr_at, make_trainee, train_step
from trainer.train import build_model_for_store

BYTES_PER_PARAM = {"optimizer": 28, "ema": 12, "grad_clip": 12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="DiT-S/8", choices=DIT_PRESETS)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps (after 3 warm-ups)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-scope", default="model", choices=COMPILE_SCOPES)
    ap.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    ap.add_argument("--compile-cache", default=None)
    ap.add_argument("--precision", default="auto", choices=PRECISIONS)
    ap.add_argument("--bf16-weights", action="store_true", help="bf16 compute copy, fp32 masters")
    ap.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS)
    ap.add_argument("--data", default="gpu" if torch.cuda.is_available() else "memory")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        store = LatentStore(bench_store(Path(tmp) / "s.zarr", max(256, 4 * args.batch_size)))
        cfg = resolve_config(
            None,
            {
                "store": str(store.path),
                "run": str(Path(tmp) / "run"),
                "model": args.model,
                "batch_size": args.batch_size,
                "warmup_steps": 0,
                "compile": args.compile,
                "compile_scope": args.compile_scope,
                "compile_mode": args.compile_mode,
                "precision": args.precision,
                "bf16_weights": args.bf16_weights,
                "attention": args.attention,
                "data": args.data,
            },
        )
        dist = setup_distributed(None)
        try:
            cache = args.compile_cache if args.compile else None
            with compile_cache(None if cache is None else Path(cache)):
                result = profile(cfg, store, dist, args)
        finally:
            teardown_distributed()
    print(json.dumps(result))


def profile(cfg, store, dist, args) -> dict:
    device, cuda = dist.device, dist.device.type == "cuda"
    model = build_model_for_store(cfg, store).to(device)
    layout = BatchLayout(batch_size=cfg.batch_size, grad_accum=1, rank=0, world_size=1)
    norm = normalization_from_store(store, cfg.normalization)
    data = build_batches(store, norm, layout, mode=cfg.data, seed=0, device=device)
    objective, params = FlowMatching(), sum(p.numel() for p in model.parameters())
    batches = data.get(0, 0)

    def fwd_bwd():
        from foundation.precision import autocast, resolve_precision

        x, y = batches[0]["latents"], batches[0]["labels"]
        with autocast(device, resolve_precision(cfg.precision, device)):
            loss = objective.loss(model, x, y, torch.Generator(device).manual_seed(0)).value
        loss.backward()
        model.zero_grad(set_to_none=True)

    flops = flop_counts(fwd_bwd)  # eager: the same arithmetic the compiled step does
    trainee = make_trainee(model, cfg, dist)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def steps(first: int, count: int) -> None:
        for step in range(first, first + count):
            batch = data.get(*divmod(step, data.steps_per_epoch))
            kw = dict(step=step, lr=lr_at(step, cfg), cfg=cfg, layout=layout, device=device)
            train_step(trainee, objective, batch, **kw)

    t = time.perf_counter()
    steps(0, 3)
    sync()
    warmup_s = time.perf_counter() - t
    syncs = count_host_syncs(lambda: steps(3, args.steps)) if cuda else None
    sync()
    with profile_region() as prof:
        t = time.perf_counter()
        steps(3 + args.steps, args.steps)
        sync()
        seconds = time.perf_counter() - t
    moved = {k: v * params for k, v in BYTES_PER_PARAM.items()}
    summary = summarize(prof, calls=args.steps, seconds=seconds, flops=flops, bytes_by_class=moved)
    peak = peak_flops(device)
    total_flops = sum(flops.values())
    images_per_s = cfg.batch_size * args.steps / seconds
    return {
        "bench": "profile_train",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "parameters": params,
        "batch_size": cfg.batch_size,
        "compile": cfg.compile,
        "compile_scope": cfg.compile_scope if cfg.compile else None,
        "compile_mode": cfg.compile_mode if cfg.compile else None,
        "precision": cfg.precision,
        "bf16_weights": cfg.bf16_weights,
        "attention": cfg.attention,
        "data": cfg.data,
        "warmup_s": round(warmup_s, 2),
        "images_per_s_profiled": images_per_s,
        "counted_tflop_per_s": total_flops * args.steps / seconds / 1e12,
        "mfu_counted": None if peak is None else total_flops * args.steps / seconds / peak,
        "host_syncs_per_step": None if syncs is None else syncs / args.steps,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        **summary,
    }


def count_host_syncs(run) -> int:
    """How many times run() made the host wait for the GPU (torch's CUDA sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


if __name__ == "__main__":
    main()
