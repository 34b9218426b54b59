"""Memory-mode load of one store from an S3 server vs from local disk, side by side.

    python bench/bench_objstore.py [--samples 16384] [--threads 1 4 16] [--repeats 3]
                                   [--baseline /work/main]

The same random store (4x32x32 uint8 latents, shards of --shard-size) is written to a local
folder and to a local S3-compatible server (moto, its own process on 127.0.0.1), then loaded
whole with `load_latents` (the trainer's memory and gpu modes, verifying) at each thread count.
With --baseline, another checkout of latentdit (an earlier load path) writes and loads its own
pair of stores on the same server in the same run, cell by cell alternating with this one.
Each load runs in a fresh process of the checkout under test (the timing excludes imports).
Prints one JSON object; goal (issue 14): S3 within 2x of local disk. moto is a Python server on
the same cores as the client: a real object store serves shards in parallel from many
machines, so this ratio is pessimistic for bandwidth and optimistic for latency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testkit.s3 import make_bucket, s3_server, s3fs_filesystem

ROOT = Path(__file__).resolve().parents[1]
# Runs in a checkout under test: only names every latentdit since the object-store wave has.
CHILD = """
import hashlib, json, sys, time
from latent_store import load_latents, open_store
from testkit import write_random_store
op, path, n, shard, threads, repeats = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
if op == "write":
    write_random_store(path, n, size=32, classes=1000, chunk=min(1024, shard), shard=shard)
    sys.exit()
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    arrays = load_latents(open_store(path), threads=threads)
    times.append(time.perf_counter() - t0)
digest = hashlib.blake2b(arrays.latents.tobytes(), digest_size=8).hexdigest()
print(json.dumps({"s": min(times), "MB": arrays.latents.nbytes / 1e6, "digest": digest}))
"""


def child(checkout: Path, *args) -> dict | None:
    """Run CHILD in `checkout` (its own code first on the path); its JSON answer, if any."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, "-c", CHILD, *map(str, args)]
    out = subprocess.run(command, cwd=checkout, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout) if out.stdout.strip() else None


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


def bench(
    samples: int, shard_size: int, threads: list[int], repeats: int, baseline: Path | None
) -> dict:
    local = Path(tempfile.mkdtemp(prefix="bench_objstore_"))
    checkouts = {"this": ROOT, **({"baseline": baseline} if baseline else {})}
    rows, digests = [], set()
    try:
        with s3_server(own_process=True):
            bucket = make_bucket("bench")
            paths = {}
            for name, checkout in checkouts.items():
                paths[name] = {"disk": local / f"{name}.zarr", "s3": f"{bucket}/{name}.zarr"}
                for path in paths[name].values():
                    child(checkout, "write", path, samples, shard_size, 0, 0)
            raw_s = raw_get_s(paths["this"]["s3"], repeats)
            for n in threads:
                for name, checkout in checkouts.items():
                    cell = {
                        where: child(checkout, "load", path, 0, 0, n, repeats)
                        for where, path in paths[name].items()
                    }
                    digests |= {c["digest"] for c in cell.values()}
                    mb = cell["disk"]["MB"]
                    rows.append(
                        {
                            "code": name,
                            "threads": n,
                            "disk_MB_per_s": round(mb / cell["disk"]["s"]),
                            "s3_MB_per_s": round(mb / cell["s3"]["s"]),
                            "s3_over_disk_time": round(cell["s3"]["s"] / cell["disk"]["s"], 2),
                        }
                    )
    finally:
        shutil.rmtree(local, ignore_errors=True)
    assert len(digests) == 1, "the loads returned different latents"
    ours = [r for r in rows if r["code"] == "this"]
    return {
        "bench": "objstore",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.node()}",
        "server": "moto (own process, 127.0.0.1)",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "baseline": str(baseline) if baseline else None,
        "samples": samples,
        "shard_size": shard_size,
        "MB": round(mb, 1),
        "s3_raw_concurrent_get_MB_per_s": round(mb / raw_s),
        "loads": rows,
        "goal_s3_within_2x_met": min(r["s3_over_disk_time"] for r in ours) <= 2.0,
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=16384)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", type=Path, help="another latentdit checkout, timed alongside")
    args = p.parse_args()
    result = bench(args.samples, args.shard_size, args.threads, args.repeats, args.baseline)
    print(json.dumps(result))
