"""Decode and crop in DataLoader workers; failures travel as records, never as exceptions.

Batches never cross a store shard and always cover the same indices for a given shard and batch
size, so what a shard's latents are does not depend on how shards are dealt to ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from foundation.files import FileRefusedError
from foundation.preemption import ignore_stop_signals
from pipeline.preprocess import ImageDecodeError, PreprocessConfig, preprocess
from pipeline.source import ImageSource


@dataclass(frozen=True)
class Item:
    """One sample after decoding: its crop and original mode, or the reason it failed."""

    index: int
    crop: np.ndarray | None
    mode: str | None
    error: str | None


@dataclass(frozen=True)
class Batch:
    """The decoded samples of one batch (crops stacked) and the failed ones."""

    indices: list[int]  # every index of the batch, in order
    ok: list[int]  # indices with a crop, in the order of `crops`
    crops: torch.Tensor  # uint8 (len(ok), H, W, 3)
    modes: list[str]  # original image mode of each ok sample
    failures: list[tuple[int, str]]  # (index, reason)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (pin_memory=True)."""
        return replace(self, crops=self.crops.pin_memory())


class CropDataset(Dataset):
    """Map-style dataset over a source: item i is the ADM crop of sample i, or its failure."""

    def __init__(self, source: ImageSource, cfg: PreprocessConfig) -> None:
        self.source, self.cfg = source, cfg

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Item:
        return load_item(self.source, index, self.cfg)


def load_item(source: ImageSource, index: int, cfg: PreprocessConfig) -> Item:
    """Read, decode and crop one sample; any problem with the file becomes a failure record."""
    try:
        crop, mode = preprocess(source.read(index), cfg)
    except (ImageDecodeError, FileRefusedError) as e:
        return Item(index, None, None, str(e))
    except OSError as e:
        return Item(index, None, None, f"unreadable: {e.__class__.__name__}: {e}")
    return Item(index, crop, mode, None)


def collate(items: Sequence[Item]) -> Batch:
    ok = [it for it in items if it.crop is not None]
    crops = (
        torch.from_numpy(np.stack([it.crop for it in ok]))
        if ok
        else torch.zeros((0, 0, 0, 3), dtype=torch.uint8)
    )
    return Batch(
        indices=[it.index for it in items],
        ok=[it.index for it in ok],
        crops=crops,
        modes=[it.mode for it in ok],
        failures=[(it.index, it.error) for it in items if it.error is not None],
    )


def shard_batches(bounds: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Split each [start, stop) range into consecutive batches of at most `batch_size` indices."""
    return [
        list(range(b, min(b + batch_size, stop)))
        for start, stop in bounds
        for b in range(start, stop, batch_size)
    ]


def crop_loader(
    source: ImageSource,
    cfg: PreprocessConfig,
    batches: list[list[int]],
    *,
    workers: int,
    pin_memory: bool,
    prefetch: int = 2,
) -> DataLoader:
    """A DataLoader yielding a `Batch` for each index list of `batches`, in order."""
    return DataLoader(
        CropDataset(source, cfg),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=ignore_stop_signals,  # the main process decides when to stop
        prefetch_factor=prefetch
        if workers
        else None,  # batches queued per worker, in shared memory
    )
