"""The cost of verifying a store while loading it: memory-mode load with and without verify.

    python bench/bench_verify.py [--samples 1281167] [--out /tmp/bench_verify.zarr] [--repeats 5]
                                 [--checksums xxh3-128 blake2b-128]

For each shard checksum kind (default: the one writers record; blake2b-128 is what stores
written before it hold), writes a store of the ImageNet-256 layout (4x32x32 uint8 latents, 1000
classes, 8192-sample shards) through the real writer, then times `load_latents` (the memory and
gpu modes' reader) with verify off and on, alternating, page cache warm for both: wall time
and this process's CPU time (all threads), best of the repeats; and the store-wide checks alone
(seal incl. the 1.28M keys, summary). Prints one JSON object. Target (DESIGN.md): verify adds
at most 10% to the load time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from functools import partial
from unittest import mock

import numpy as np

from latent_store import (
    ClassInfo,
    LatentStore,
    QuantParams,
    StoreSpec,
    StoreWriter,
    VaeInfo,
    create_store,
    finalize_store,
    load_latents,
)
from latent_store.arrays import latent_arrays
from latent_store.checksums import CHECKSUM, CHECKSUMS, shard_checksum
from latent_store.reader import LOAD_THREADS
from latent_store.verify import verify_store

LATENT = (4, 32, 32)
CLASSES = 1000


def write(out: str, samples: int, checksum: str) -> float:
    """Seconds to create and write the store (random codes, every label in range), its shard
    records of kind `checksum` (the real writer, its checksum function set to that kind)."""
    shutil.rmtree(out, ignore_errors=True)
    spec = StoreSpec(
        num_samples=samples,
        arrays=latent_arrays(LATENT, QuantParams(offset=(-4.0,) * 4, scale=(8 / 255,) * 4)),
        vae=VaeInfo(id="bench/vae", scaling_factor=0.18215),
        classes=tuple(ClassInfo(index=i, id=f"n{i:08d}") for i in range(CLASSES)),
        source={"kind": "bench"},
    )
    t0 = time.perf_counter()
    keys = [f"train/n{i % CLASSES:08d}/{i}.JPEG" for i in range(samples)]
    store = create_store(out, spec, keys)
    writer = StoreWriter(store)
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (spec.shard_size, *spec.sample_shape), dtype=np.uint8)
    kind = partial(shard_checksum, algorithm=checksum)
    with mock.patch("latent_store.writer.shard_checksum", kind):
        for shard in range(spec.num_shards):
            a, b = spec.shard_bounds(shard)
            labels = (np.arange(a, b) % CLASSES).astype(np.int16)
            writer.write_shard(shard, {"latents": block[: b - a]}, labels)
    finalize_store(store)
    return time.perf_counter() - t0


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all this process's threads) of `fn()`."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_kind(samples: int, out: str, repeats: int, threads: int, checksum: str) -> dict:
    write_s = write(out, samples, checksum)
    load_latents(out, verify=False, threads=threads)  # warm the page cache
    plain, checked = [], []
    for _ in range(repeats):
        plain.append(timed(lambda: load_latents(out, verify=False, threads=threads)))
        checked.append(timed(lambda: load_latents(out, verify=True, threads=threads)))
    store_checks, _ = timed(lambda: verify_store(LatentStore(out)))
    best = {k: min(t[0] for t in v) for k, v in (("plain", plain), ("checked", checked))}
    cpu = {k: min(t[1] for t in v) for k, v in (("plain", plain), ("checked", checked))}
    return {
        "checksum": checksum,
        "write_s": round(write_s, 2),
        "load_s": [round(t, 3) for t, _ in plain],
        "load_verified_s": [round(t, 3) for t, _ in checked],
        "load_cpu_s": round(cpu["plain"], 3),
        "load_verified_cpu_s": round(cpu["checked"], 3),
        "store_checks_s": round(store_checks, 3),
        "load_GBps": round(samples * np.prod(LATENT) / best["plain"] / 1e9, 2),
        "verify_overhead": round(best["checked"] / best["plain"] - 1, 4),
        "verify_cpu_overhead": round(cpu["checked"] / cpu["plain"] - 1, 4),
    }


def bench(samples: int, out: str, repeats: int, threads: int, checksums: list[str]) -> dict:
    runs = [bench_kind(samples, out, repeats, threads, kind) for kind in checksums]
    return {
        "bench": "verify",
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "samples": samples,
        "latent_shape": list(LATENT),
        "bytes": samples * int(np.prod(LATENT)),
        "threads": threads,
        "runs": runs,
        "target_overhead": 0.10,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_281_167)
    parser.add_argument("--out", default="/tmp/bench_verify.zarr")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checksums", nargs="+", default=[CHECKSUM], choices=sorted(CHECKSUMS))
    parser.add_argument("--threads", type=int, default=LOAD_THREADS, help="reader threads")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    args = parser.parse_args()
    try:
        result = bench(args.samples, args.out, args.repeats, args.threads, args.checksums)
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
