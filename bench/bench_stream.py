"""Stream mode's reader against reading the same shard files raw, on a store of wide latents.

    python bench/bench_stream.py [--samples 3072] [--shard-size 256] [--rounds 3] [--out DIR]

Writes a store of RAE DINOv2-B sized latents (768x16x16 uint8: 196,608 bytes per sample, one
variant) with the real writer (`StoreWriter`, sealed), then times, side by side in alternating
rounds over the same shard order:
- raw:    open + read of every shard file, whole (`LatentStore.chunk_key`: the latents' and
          labels' shard objects): the bytes in RAM, as the disk and the page cache give them;
- raw_readinto: the same into a fresh numpy buffer of the file's size (`readinto`, no resize);
- stream: `latent_store.reader.iter_shards` with verify (each shard's checksum and record
          checked, labels filtered, next shard prefetched), every shard consumed whole;
- stream_no_verify: the same with verify=False.
Each stream reader keeps one pool of shard memory (`shard_file.Buffers`) from pass to pass, as the
trainer's stream mode keeps one from epoch to epoch.
Each pass runs "warm" (files in the page cache, as after writing) and "cold" (every shard file
dropped from the page cache first with posix_fadvise(DONTNEED), so the bytes come from the disk).
The ratio stream / raw (bytes per second) of each is printed against the faster of the two raw
readers (median of the rounds); target >= 0.8. One JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages

from latent_store import LatentStore, StoreWriter, create_store, finalize_store
from latent_store.reader import iter_shards, shard_order
from latent_store.shard_file import Buffers
from testkit.stores import make_spec

LATENT = (768, 16, 16)  # RAE's DINOv2-B tokens at 256 px
CLASSES = 1000


def write_store(out: Path, samples: int, shard_size: int, chunk_size: int) -> LatentStore:
    """A sealed store of random uint8 latents, written shard by shard by the real writer."""
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(0)
    channels, size, _ = LATENT
    spec = make_spec(
        samples, channels=channels, size=size, classes=CLASSES, chunk=chunk_size, shard=shard_size
    )
    store = create_store(out, spec, [str(i) for i in range(samples)])
    writer = StoreWriter(store)
    for shard in range(spec.num_shards):
        a, b = spec.shard_bounds(shard)
        latents = rng.integers(0, 256, (b - a, 1, *LATENT), dtype=np.uint8)
        writer.write_shard(shard, {"latents": latents}, rng.integers(0, CLASSES, b - a))
    finalize_store(store)
    return LatentStore(out)


def shard_paths(store: LatentStore, order: list[int]) -> list[list[Path]]:
    """The files stream mode reads of each shard: the latents' and the labels' shard objects."""
    names = ("latents", "labels")
    return [[store.local_root / store.chunk_key(n, s) for n in names] for s in order]


def drop_cache(paths: list[list[Path]]) -> None:
    """Evict the files from the page cache (clean pages; no root needed)."""
    for path in (p for files in paths for p in files):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_raw(paths: list[list[Path]]) -> int:
    """open + read of every file, whole; the bytes read."""
    total = 0
    for files in paths:
        for path in files:
            with open(path, "rb") as f:
                total += len(f.read())
    return total


def read_raw_into(paths: list[list[Path]]) -> int:
    """open + readinto a fresh buffer of each file's size; the bytes read."""
    total = 0
    for files in paths:
        for path in files:
            with open(path, "rb", buffering=0) as f:
                buf = np.empty(os.fstat(f.fileno()).st_size, np.uint8)
                total += f.readinto(memoryview(buf))
    return total


def read_stream(store: LatentStore, verify: bool, buffers: Buffers) -> int:
    """Every shard through the stream-mode reader, as the trainer reads an epoch (one pool of
    shard memory for every pass, as for every epoch); the latent and label bytes it yielded."""
    total = 0
    for shard in iter_shards(store, verify=verify, buffers=buffers):
        total += shard.latents.nbytes + len(shard.labels) * 2  # labels as stored (int16)
    return total


def bench(args: argparse.Namespace) -> dict:
    store = write_store(Path(args.out), args.samples, args.shard_size, args.chunk_size)
    order = shard_order(store.spec.num_shards, seed=0, epoch=0, rank=0, world_size=1)
    paths = shard_paths(store, order)
    file_bytes = sum(p.stat().st_size for files in paths for p in files)
    pools = (Buffers(), Buffers())  # each stream reader's, kept from pass to pass
    readers = {
        "raw": lambda: read_raw(paths),
        "raw_readinto": lambda: read_raw_into(paths),
        "stream": lambda: read_stream(store, verify=True, buffers=pools[0]),
        "stream_no_verify": lambda: read_stream(store, verify=False, buffers=pools[1]),
    }
    seconds: dict[str, list[float]] = {f"{n}_{c}": [] for c in ("warm", "cold") for n in readers}
    for _ in range(args.rounds):
        for cache in ("warm", "cold"):
            for name, read in readers.items():
                if cache == "cold":
                    drop_cache(paths)
                else:
                    read_raw(paths)  # into the page cache
                t0 = time.perf_counter()
                read()
                seconds[f"{name}_{cache}"].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    result = {
        "bench": "stream",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.node()}",
        "samples": args.samples,
        "bytes_per_sample": int(np.prod(LATENT)),
        "shard_size": args.shard_size,
        "chunk_size": args.chunk_size,
        "shards": store.spec.num_shards,
        "file_bytes": file_bytes,
        "rounds": args.rounds,
        "MB_per_s": {k: round(file_bytes / 1e6 / s) for k, s in median.items()},
        "samples_per_s": {k: round(args.samples / s) for k, s in median.items()},
    }
    for cache in ("warm", "cold"):
        for name in ("stream", "stream_no_verify"):
            raw = min(median[f"raw_{cache}"], median[f"raw_readinto_{cache}"])
            result[f"ratio_{name}_vs_raw_{cache}"] = round(raw / median[f"{name}_{cache}"], 3)
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=3072)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="/tmp/latentdit_bench_stream.zarr")
    p.add_argument("--keep", action="store_true", help="keep the store afterwards")
    print(json.dumps(bench(p.parse_args())))


if __name__ == "__main__":
    main()
