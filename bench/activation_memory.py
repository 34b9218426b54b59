"""Activation memory of a DiT training forward by recomputed blocks (`--checkpoint-blocks`), on CPU.

    python bench/activation_memory.py [--model DiT-XL/2] [--batch-size 1] [--blocks 0 7 14 28]

Counts the bytes autograd keeps for backward (`trainer.metrics.saved_activation_bytes`: a real
count through saved_tensors_hooks, no allocator needed) in bf16-autocast forwards of random
4x32x32 latents (the ImageNet-256 shape) at batches B and 2B: the difference is the per-sample
part (scaled to a batch of 256), the rest is kept once per step whatever the batch: under
autocast with fp32 weights, mostly the bf16 casts of the weights that linear layers save for
backward, which --bf16-weights does not make (its bf16 weights are parameters, not counted).
Prints one JSON object per (N, weights). Left out: weights, gradients, AdamW state and EMA, and
the allocator's slack.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages

from trainer.metrics import saved_activation_bytes
from trainer.mixed_precision import bf16_compute_copy
from trainer.model import DIT_PRESETS, build_model

LATENT, CLASSES, REFERENCE_BATCH = (4, 32, 32), 1000, 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="DiT-XL/2", choices=DIT_PRESETS)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument(
        "--blocks", type=int, nargs="+", default=None, help="N values (default: 0, d/4, d/2, d)"
    )
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(
        args.model, input_size=LATENT[-1], in_channels=LATENT[0], num_classes=CLASSES
    )
    depth = model.config["depth"]
    models = {"fp32": model, "bf16": bf16_compute_copy(model)}

    def saved(m, batch: int) -> int:
        x, t = torch.randn(batch, *LATENT), torch.rand(batch) * 1000
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return saved_activation_bytes(m, x, t, torch.randint(0, CLASSES, (batch,)))

    for n in args.blocks or [0, depth // 4, depth // 2, depth]:
        for weights, m in models.items():
            m.checkpoint_blocks = n
            t0 = time.perf_counter()
            one, two = saved(m, args.batch_size), saved(m, 2 * args.batch_size)
            per_sample = (two - one) / args.batch_size
            print(json.dumps({
                "bench": "activation_memory", "model": args.model, "checkpoint_blocks": n,
                "depth": depth, "weights": weights, "precision": "bf16 autocast",
                "batch_sizes": [args.batch_size, 2 * args.batch_size], "saved_bytes": [one, two],
                "per_sample_mb": per_sample / 2**20,
                "per_step_fixed_gb": (one - per_sample * args.batch_size) / 2**30,
                f"saved_gb_at_batch_{REFERENCE_BATCH}": (one + per_sample * (REFERENCE_BATCH - args.batch_size)) / 2**30,
                "seconds": round(time.perf_counter() - t0, 2),
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
