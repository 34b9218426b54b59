"""Memory-mode load of one store from an S3 server vs from local disk, side by side.

    python bench/bench_objstore.py [--samples 16384] [--threads 1 4 16] [--repeats 3]

The same random store (4x32x32 uint8 latents, shards of --shard-size) is written to a local
folder and to a local S3-compatible server (moto, its own process on 127.0.0.1), then loaded
whole with `load_latents` (the trainer's memory and gpu modes) at each thread count. Prints one
JSON object; goal (issue 14): S3 within 2x of local disk with parallel shard reads. moto is a
Python server on the same cores as the client: a real object store serves shards in parallel
from many machines, so this ratio is pessimistic for bandwidth and optimistic for latency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np

from latent_store import load_latents, open_store
from testkit import write_random_store
from testkit.s3 import make_bucket, s3_server, s3fs_filesystem

LATENT = (4, 32, 32)


def write(path: str, samples: int, shard_size: int) -> None:
    """A store of random latents; the same bytes at every path (seeded)."""
    chunk = min(1024, shard_size)
    write_random_store(path, samples, size=LATENT[1], classes=1000, chunk=chunk, shard=shard_size)


def best_load_s(path: str, threads: int, repeats: int) -> tuple[float, np.ndarray]:
    """Fastest of `repeats` whole loads (opening the store included)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        arrays = load_latents(open_store(path), threads=threads)
        times.append(time.perf_counter() - t0)
    return min(times), arrays.latents


def raw_get_s(url: str, repeats: int) -> float:
    """Fastest of `repeats` concurrent GETs of every shard object: the ceiling the server allows."""
    fs = s3fs_filesystem()
    keys = [k for k in fs.find(url.removeprefix("s3://")) if "/latents/c/" in k]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fs.cat(keys)
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(samples: int, shard_size: int, threads: list[int], repeats: int) -> dict:
    local = tempfile.mkdtemp(prefix="bench_objstore_")
    try:
        with s3_server(own_process=True):
            url = make_bucket("bench") + "/store.zarr"
            write(f"{local}/store.zarr", samples, shard_size)
            write(url, samples, shard_size)
            raw_s = raw_get_s(url, repeats)
            rows, reference = [], None
            for n in threads:
                disk_s, disk = best_load_s(f"{local}/store.zarr", n, repeats)
                s3_s, s3 = best_load_s(url, n, repeats)
                reference = disk if reference is None else reference
                assert np.array_equal(disk, s3) and np.array_equal(disk, reference)
                mb = disk.nbytes / 1e6
                rows.append(
                    {
                        "threads": n,
                        "disk_MB_per_s": round(mb / disk_s),
                        "s3_MB_per_s": round(mb / s3_s),
                        "s3_over_disk_time": round(s3_s / disk_s, 2),
                    }
                )
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return {
        "bench": "objstore",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.node()}",
        "server": "moto (own process, 127.0.0.1)",
        "samples": samples,
        "shard_size": shard_size,
        "MB": round(reference.nbytes / 1e6, 1),
        "s3_raw_concurrent_get_MB_per_s": round(reference.nbytes / 1e6 / raw_s),
        "loads": rows,
        "goal_s3_within_2x_met": min(r["s3_over_disk_time"] for r in rows) <= 2.0,
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=16384)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(json.dumps(bench(args.samples, args.shard_size, args.threads, args.repeats)))
