"""Training throughput through the real loop (`trainer.train.train`): images/s, MFU, data share.

    python bench/bench_train.py [--models DiT-S/2 DiT-B/2] [--batch-size 4] [--steps 5] [--threads 2]

Writes a store of random 4x32x32 latents (the ImageNet-256 shape) with the real writer, trains
each model for a few steps in a temporary run folder, and reads the loop's own log.jsonl records
(log_every=1), skipping the first `--warmup` steps. Prints one JSON object per model, then one
comparing them.

MFU needs a peak: on a known GPU the datasheet bf16 figure (trainer.metrics.PEAK_BF16_TFLOPS); on
a CPU the fp32 matmul throughput measured here, so CPU MFU reads "share of this machine's GEMM
speed". Target (DESIGN.md): DiT-XL/2 in bf16 on one H100 at MFU >= 50%.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages

from testkit import write_random_store
from trainer.config import (
    ATTENTION_BACKENDS,
    COMPILE_MODES,
    COMPILE_SCOPES,
    DATA_MODES,
    PRECISIONS,
    resolve_config,
)
from trainer.metrics import peak_flops
from trainer.model import DIT_PRESETS, build_model, forward_flops
from trainer.train import train

LATENT = (4, 32, 32)
CLASSES = 1000
GEMM_SIZE = 2048


def bench_store(path: Path, samples: int) -> Path:
    """A store of random ImageNet-256-shaped latents with both variants, by the real writer."""
    return write_random_store(
        path,
        samples,
        size=LATENT[-1],
        channels=LATENT[0],
        variants=2,
        classes=CLASSES,
        chunk=64,
        shard=samples,
    )


def gemm_flops(device: torch.device, repeats: int = 5) -> float:
    """Measured fp32 (CPU) or bf16 (GPU) matmul FLOP/s: the peak that CPU MFU is relative to."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device, dtype=dtype)
    a @ a
    t0 = time.perf_counter()
    for _ in range(repeats):
        (a @ a).sum().item()
    return 2 * GEMM_SIZE**3 * repeats / (time.perf_counter() - t0)


def bench_model(
    model: str, batch_size: int, store: Path, run: Path, args, peak: float | None
) -> dict:
    cfg = resolve_config(
        None,
        {
            "store": str(store),
            "run": str(run),
            "model": model,
            "steps": args.warmup + args.steps,
            "batch_size": batch_size,
            "log_every": args.log_every,
            "ckpt_every": 10**9,
            "keep_last": 1,
            "warmup_steps": 0,
            "compile": args.compile,
            "compile_scope": args.compile_scope,
            "compile_mode": args.compile_mode,
            "compile_cache": args.compile_cache,
            "bf16_weights": args.bf16_weights,
            "checkpoint_blocks": args.checkpoint_blocks,
            "attention": args.attention,
            "prefetch": args.prefetch,
            "grad_as_bucket_view": args.grad_as_bucket_view,
            "data": args.data,
            "precision": args.precision,
            "peak_tflops": None if peak is None else peak / 1e12,
        },
    )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(cfg)
    wall_s = time.perf_counter() - t0
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    shutil.rmtree(run)  # the final checkpoint of a large model is GBs
    timed = records[args.warmup // args.log_every :]
    steps = len(timed) * args.log_every
    seconds = sum(args.log_every / r["steps_per_s"] for r in timed)
    data_s = sum(r["data_fraction"] * args.log_every / r["steps_per_s"] for r in timed)
    images_per_s = steps * batch_size / seconds
    with torch.device("meta"):
        config = build_model(model, input_size=32, in_channels=4, num_classes=CLASSES).config
    flops = forward_flops(config)
    return {
        "model": model,
        "batch_size": batch_size,
        "data": args.data,
        "precision": args.precision,
        "compile": args.compile,
        "compile_scope": args.compile_scope if args.compile else None,
        "compile_mode": args.compile_mode if args.compile else None,
        "bf16_weights": args.bf16_weights,
        "checkpoint_blocks": args.checkpoint_blocks,
        "attention": args.attention,
        "prefetch": args.prefetch,
        "grad_as_bucket_view": args.grad_as_bucket_view,
        "steps_timed": steps,
        "log_every": args.log_every,
        "seconds_per_step": seconds / steps,
        "images_per_s": images_per_s,
        "forward_gflop_per_image": flops / 1e9,
        "train_gflop_per_s": 3 * flops * images_per_s / 1e9,
        "mfu": None if peak is None else 3 * flops * images_per_s / peak,
        "data_fraction": data_s / seconds,
        "final_loss": timed[-1]["loss"],
        "losses": [r["loss"] for r in records],
        "peak_memory_gb": peak_gb,
        "wall_s_with_compile_and_checkpoint": wall_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2"], choices=DIT_PRESETS)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[4], help="one or a sweep")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument(
        "--log-every",
        type=int,
        default=1,
        help="steps per log record; above 1 the loop runs unsynchronized between records, as in "
        "a real run (--steps and --warmup must be multiples)",
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-scope", default="model", choices=COMPILE_SCOPES)
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    parser.add_argument("--compile-cache", default=None, help="torch.compile cache folder")
    parser.add_argument(
        "--bf16-weights", action="store_true", help="bf16 compute copy, fp32 masters (bf16 only)"
    )
    parser.add_argument(
        "--checkpoint-blocks", type=int, default=None, help="recompute the first N blocks"
    )
    parser.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS)
    parser.add_argument("--prefetch", action="store_true", help="make the next batch ahead")
    parser.add_argument("--grad-as-bucket-view", action="store_true")
    parser.add_argument("--data", default="memory", choices=DATA_MODES)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 on GPU")
    args = parser.parse_args()
    if args.steps % args.log_every or args.warmup % args.log_every:
        parser.error("--steps and --warmup must be multiples of --log-every")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = gemm_flops(device) if device.type == "cpu" else peak_flops(device)  # GPU: datasheet
    context = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.machine()} CPU",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_gemm_gflop_per_s": None if peak is None else peak / 1e9,
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        store = bench_store(Path(tmp) / "store.zarr", args.samples)
        for model in args.models:
            for batch in args.batch_size:
                run = Path(tmp) / "run"
                result = {**bench_model(model, batch, store, run, args, peak), **context}
                print(json.dumps(result), flush=True)
                results.append(result)
    compare = {f"{r['model']}@{r['batch_size']}": round(r["images_per_s"], 3) for r in results}
    print(json.dumps({"compare": compare}))


if __name__ == "__main__":
    main()
