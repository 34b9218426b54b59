"""Evaluation throughput: Inception feature extraction images/s, and the metric computations.

    python bench/bench_evaluate.py [--images 64] [--sizes 32 256] [--batch 32] [--device cpu]

Runs `evaluation`'s own code (the TF1 resize, the cached ADM-matching Inception port, the batched
extraction with its prefetch thread) on random uint8 images of each size, then times the metrics
on features of that many images: ADM's Fréchet distance (scipy sqrtm of a 2048 x 2048 product)
and precision/recall (k = 3 radii, blocked distances). Prints one JSON object. The issue's GPU
target (50,000 samples vs 10,000 references, all metrics, <= 60 s on one H100/H200) needs
`--device cuda --images 50000`; it has not been measured in this project.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from evaluation.features import extract_features
from evaluation.inputs import array_images
from evaluation.metrics import GaussianStats, frechet_distance, precision_recall
from evaluation.network import load_inception
from evaluation.resize import inception_input


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 256])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    net = load_inception(device=args.device)
    rng = np.random.default_rng(0)
    rows, pool = [], None
    for size in args.sizes:
        images = rng.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
        warm = array_images("warmup", "warmup", images[: args.batch])
        extract_features(warm, [net], batch_size=args.batch, device=args.device)
        f = extract_features(array_images("bench", "bench", images), [net], batch_size=args.batch,
                             device=args.device)  # fmt: skip
        _, resize_s = timed(lambda: inception_input(torch.from_numpy(images[: args.batch])))  # noqa: B023
        rows.append({"size": size, "images": args.images, "images_per_s": f.images_per_s,
                     "resize_ms_per_image": 1e3 * resize_s / args.batch})  # fmt: skip
        pool = f.features["pool_3"]
    stats, stats_s = timed(lambda: GaussianStats.of(pool))
    _, fid_s = timed(lambda: frechet_distance(stats, GaussianStats.of(pool[::-1].copy())))
    _, pr_s = timed(lambda: precision_recall(pool, pool, device=args.device))
    print(json.dumps({
        "bench": "evaluate", "device": args.device, "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "network_sha1": net.sha1,
        "batch": args.batch, "extraction": rows, "stats_s": stats_s, "fid_s": fid_s,
        "precision_recall_s": pr_s, "precision_recall_images": len(pool),
        "gpu_target_50k_vs_10k": "not measured",
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
