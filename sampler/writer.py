"""Write finished batches on a background thread while the next batch is solved.

    with BatchWriter() as writer:
        for batch in batches:
            images = to_host(decoder.decode_on_device(z))  # copy started, not waited for
            writer.submit(write_batch, batch, images)        # PNGs and the npz part, in order

One write runs at a time, in submission order: `submit` first waits for the previous write (which
ran while this batch was solved), so at most two batches of images are held, and a failed write (a
full disk, an interrupt) is raised in the caller at its next `submit` or at exit, before anything
later is written.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor


class HostImages:
    """uint8 images on their way to host memory: `numpy()` waits for the copy, then returns them.

    On CUDA the device-to-host copy goes into pinned memory without blocking the host, behind the
    decoder's kernels; an event marks its end, so the solve of the next batch is queued meanwhile.
    """

    def __init__(self, images: Tensor) -> None:
        self.event = None
        if images.device.type == "cuda":
            host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
            host.copy_(images, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            images = host
        self.images = images

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.images.numpy()


class BatchWriter:
    """A one-thread writer: calls run in order, one at a time; failures surface in the caller."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sample-writer")
        self.pending: list[Future] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) in the background once the previous write has finished (its error raised)."""
        self.drain()
        self.pending.append(self.pool.submit(fn, *args))

    def drain(self) -> None:
        """Wait for the queued write; raise its failure."""
        while self.pending:
            self.pending.pop(0).result()

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            for future in self.pending:
                future.cancel()
            self.pool.shutdown(wait=True)
