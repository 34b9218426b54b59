"""Tar indexing speed: how fast a webdataset source lists img2dataset-style tars (one process).

    python bench/bench_tar_index.py [--tars 4] [--per-tar 5000] [--dir /tmp/bench_tars]

Writes tars of (jpg, json) samples with webdataset's TarWriter, then times `index_tar` over
them. Prints one JSON object. Every rank pays this once per run, divided by the world size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.tar_index import index_tar

IMAGE_BYTES = 20_000  # a typical small JPEG; the size does not matter to indexing


def write_tars(folder: Path, tars: int, per_tar: int) -> list[Path]:
    import webdataset as wds

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    image = os.urandom(IMAGE_BYTES)
    paths = []
    for t in range(tars):
        path = folder / f"{t:05d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(per_tar):
                meta = {"label": i % 1000, "url": f"http://example.com/{t}/{i}.jpg"}
                w.write({"__key__": f"{t:05d}{i:05d}", "jpg": image, "json": json.dumps(meta)})
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tars", type=int, default=4)
    parser.add_argument("--per-tar", type=int, default=5000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_tars"))
    args = parser.parse_args()
    paths = write_tars(args.dir, args.tars, args.per_tar)
    start = time.perf_counter()
    samples = sum(len(index_tar(p, "label")[0]) for p in paths)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "bench": "tar_index",
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "load_average_1min": os.getloadavg()[0],
                "tars": args.tars,
                "samples": samples,
                "seconds": round(seconds, 3),
                "samples_per_s": round(samples / seconds),
            }
        )
    )
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
