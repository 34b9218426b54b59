"""One image plan made by many processes: each torchrun rank makes its own slice, rank 0 finishes.

    torchrun --standalone --nproc_per_node=8 cli.py -- sample RUN --out fid/ --fid-samples 50000 --npz

The batches are cut exactly as a one-process run cuts them, then dealt out as contiguous runs, one
per rank in rank order. The FID plan interleaves the classes (label = i mod K), so every rank's
slice holds each class within one image of its share; every image keeps its own noise, so the
parts, and the `.npz` that rank 0 streams from them at the end, are those of a one-process run.
Rank 0 alone decides what is left to make (from the finished parts) and writes the manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from foundation import distributed
from foundation.distributed import DistInfo, all_gather_objects, process_group, rank_range

T = TypeVar("T")
__all__ = ["on_main", "process_group", "share", "total"]


def share(batches: list[list[int]], info: DistInfo) -> list[list[int]]:
    """This rank's contiguous run of batches: len // world or one more, in rank order."""
    mine = rank_range(len(batches), info.rank, info.world_size)
    return batches[mine.start : mine.stop]


def on_main(fn: Callable[[], T], info: DistInfo) -> T:
    """fn() run on rank 0 (`info`'s group); its result, or its LatentditError raised, on every rank."""
    return distributed.on_main(fn)


def total(count: int) -> int:
    """The sum of `count` over all ranks."""
    return sum(all_gather_objects(count))


def smallest(value: int) -> int:
    """The smallest `value` over all ranks."""
    return min(all_gather_objects(value))
