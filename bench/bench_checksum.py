"""Candidate shard checksums side by side: speed on one core, and whether they free the GIL.

    python bench/bench_checksum.py [--mb 256] [--repeats 5]

Hashes one buffer of random bytes (a few shards' worth) with blake2b-128 (hashlib: what shard
records held first), xxh3-128 (xxhash: what writers record now) and CRC32C (google-crc32c, only
if installed: it takes `bytes`, so a shard pays a copy first, which is counted). While each
hashes, a second thread counts in pure Python: if that count keeps its pace, the hash released
the GIL and can overlap a load. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import threading
import time

import numpy as np
import xxhash


def candidates() -> dict:
    found = {
        "blake2b-128": lambda b: hashlib.blake2b(b.data, digest_size=16).hexdigest(),
        "xxh3-128": lambda b: xxhash.xxh3_128(b.data).hexdigest(),
    }
    try:
        import google_crc32c
    except ImportError:
        return found
    found["crc32c (incl. the bytes copy)"] = lambda b: google_crc32c.value(b.tobytes())
    return found


def count_while(fn) -> tuple[float, float]:
    """(seconds of `fn()`, what a pure-Python thread counted per second meanwhile)."""
    stop, count = threading.Event(), [0]

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.05)
    c0, t0 = count[0], time.perf_counter()
    fn()
    seconds, counted = time.perf_counter() - t0, count[0] - c0
    stop.set()
    thread.join()
    return seconds, counted / seconds


def bench(mb: int, repeats: int) -> dict:
    data = np.random.default_rng(0).integers(0, 256, mb * 2**20, dtype=np.uint8)
    _, alone = count_while(lambda: time.sleep(0.3))
    rows = {}
    for name, fn in candidates().items():
        fn(data)
        best = min(_timed(fn, data) for _ in range(repeats))
        _, beside = count_while(lambda fn=fn: [fn(data) for _ in range(3)])
        rows[name] = {
            "GB_per_s": round(data.nbytes / best / 1e9, 2),
            "python_thread_pace_while_hashing": round(beside / alone, 2),
        }
    return {
        "bench": "checksum",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.node()}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "MB": mb,
        "memcpy_GB_per_s": round(
            data.nbytes / min(_timed(np.copy, data) for _ in range(3)) / 1e9, 2
        ),
        "checksums": rows,
    }


def _timed(fn, data) -> float:
    t0 = time.perf_counter()
    fn(data)
    return time.perf_counter() - t0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(json.dumps(bench(args.mb, args.repeats)))
