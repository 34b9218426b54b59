"""One image plan made by many processes: each torchrun rank makes its own slice, rank 0 finishes.

    torchrun --standalone --nproc_per_node=8 cli.py -- sample RUN --out fid/ --fid-samples 50000 --npz

The batches are cut exactly as a one-process run cuts them, then dealt out as contiguous runs, one
per rank in rank order. The FID plan interleaves the classes (label = i mod K), so every rank's
slice holds each class within one image of its share; every image keeps its own noise, so the
parts, and the `.npz` that rank 0 streams from them at the end, are those of a one-process run.
Rank 0 alone decides what is left to make (from the finished parts) and writes the manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch.distributed as dist

from foundation.distributed import (
    DistInfo,
    all_gather_objects,
    setup_distributed,
    teardown_distributed,
)
from foundation.errors import LatentditError

T = TypeVar("T")


@contextmanager
def process_group(device: str | None) -> Iterator[DistInfo]:
    """Join torchrun's process group (or make one of size 1); leave it only if it was made here.

    fp32 matmuls stay exact on CUDA (no TF32): sampling in fp32 means fp32.
    """
    made_here = not dist.is_initialized()
    info = setup_distributed(device, tf32=False)
    try:
        yield info
    finally:
        if made_here:
            teardown_distributed()


def share(batches: list[list[int]], info: DistInfo) -> list[list[int]]:
    """This rank's contiguous run of batches: len // world or one more, in rank order."""
    n, world, rank = len(batches), info.world_size, info.rank
    return batches[rank * n // world : (rank + 1) * n // world]


def on_main(fn: Callable[[], T], info: DistInfo) -> T:
    """fn() run on rank 0; its result, or its LatentditError raised, on every rank."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except LatentditError as e:
            error = e
    result, error = all_gather_objects((result, error))[0]
    if error is not None:
        raise error
    return result


def total(count: int) -> int:
    """The sum of `count` over all ranks."""
    return sum(all_gather_objects(count))


def smallest(value: int) -> int:
    """The smallest `value` over all ranks."""
    return min(all_gather_objects(value))
