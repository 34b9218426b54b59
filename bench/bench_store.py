"""Store throughput: shard writes, whole-store load into RAM, random batches gathered from RAM.

    python bench/bench_store.py [--samples 65536] [--out /tmp/bench_store.zarr]

Prints one JSON object. Targets (DESIGN.md): writes >= 50k samples/s, batches >= 1M samples/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time

import numpy as np
import torch
import zarr

from latent_store import (
    ClassInfo,
    StoreSpec,
    StoreWriter,
    VaeInfo,
    calibrate,
    create_store,
    dequantize,
    load_latents,
)
from latent_store.arrays import latent_arrays

BATCH = 256
LATENT = (4, 32, 32)


def _bare_zarr_write(out: str, spec: StoreSpec, shard: np.ndarray) -> float:
    """Seconds to write the same shards with zarr alone (same chunks and shards, no markers)."""
    shutil.rmtree(out, ignore_errors=True)
    sample = spec.sample_shape
    arr = zarr.create_array(
        out,
        shape=(spec.num_samples, *sample),
        dtype="uint8",
        chunks=(spec.chunk_size, *sample),
        shards=(spec.shard_size, *sample),
        compressors=None,
        fill_value=0,
    )
    t0 = time.perf_counter()
    for i in range(spec.num_shards):
        a, b = spec.shard_bounds(i)
        arr[a:b] = shard[: b - a]
    elapsed = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return elapsed


def bench(samples: int, out: str, batches: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(0)
    spec = StoreSpec(
        num_samples=samples,
        arrays=latent_arrays(
            LATENT, calibrate(rng.standard_normal((64, *LATENT)).astype(np.float32))
        ),
        vae=VaeInfo(id="bench"),
        classes=tuple(ClassInfo(index=i, id=str(i)) for i in range(1000)),
    )
    store = create_store(out, spec, [str(i) for i in range(samples)])
    shard = rng.integers(0, 256, (spec.shard_size, 1, *LATENT), dtype=np.uint8)
    labels = rng.integers(0, 1000, spec.shard_size).astype(np.int16)
    writer = StoreWriter(store)
    t0 = time.perf_counter()
    for i in range(spec.num_shards):
        a, b = spec.shard_bounds(i)
        writer.write_shard(i, {"latents": shard[: b - a]}, labels[: b - a])
    write_s = time.perf_counter() - t0

    bare_s = _bare_zarr_write(out + ".bare", spec, shard)

    t0 = time.perf_counter()
    arrays = load_latents(out)
    load_s = time.perf_counter() - t0

    gen = np.random.default_rng(1)
    idx = gen.integers(0, samples, (batches, BATCH))
    t0 = time.perf_counter()
    for b in idx:
        batch = arrays.latents[b]
    gather_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in idx:
        dequantize(arrays.latents[b], spec.quant)
    dequant_s = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    assert batch.shape == (BATCH, 1, *LATENT)
    return {
        "bench": "store",
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, {platform.node()}",
        "samples": samples,
        "shard_size": spec.shard_size,
        "write_samples_per_s": round(samples / write_s),
        "bare_zarr_write_samples_per_s": round(samples / bare_s),
        "writer_vs_bare_zarr": round(bare_s / write_s, 3),
        "load_MB_per_s": round(arrays.latents.nbytes / 1e6 / load_s),
        "batch_gather_samples_per_s": round(batches * BATCH / gather_s),
        "batch_gather_dequantize_cpu_samples_per_s": round(batches * BATCH / dequant_s),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=65536)
    p.add_argument("--out", default="/tmp/latentdit_bench_store.zarr")
    p.add_argument("--batches", type=int, default=2000)
    args = p.parse_args()
    print(json.dumps(bench(args.samples, args.out, args.batches)))
