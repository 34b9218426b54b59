"""Features of an image set through one or more networks, batched on the device while the next
batch loads.

    feats = extract_features(image_set, [inception, dinov2], batch_size=250, device="cuda")
    feats = featurize(image_set, nets, batch_size=250, device=info.device)  # under torchrun
    feats.features["pool_3"], feats.features["dinov2"]

Each batch is decoded once and goes through every network (`FeatureNet.features`: uint8
(N, H, W, 3) on the device -> {features key: (N, D)}). The networks run in float32 with TF32 off
(ADM's features are float32; TF32 matmuls would move them by ~1e-3). Batches arrive from the
input's own loader (DataLoader workers for folders) and one background thread keeps the next
batch ready while the device works on this one.

Under torchrun, `featurize` has every rank extract the features of its share of the set (a
contiguous run of the whole batches one process would cut: `ImageSet.share`) and gathers them,
in rank order, on rank 0: the same batches through the same networks, so the same features.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from evaluation.errors import EvaluationError
from evaluation.inputs import ImageSet
from foundation.distributed import all_gather_objects, gather_rows, on_all, rank_and_world

log = logging.getLogger(__name__)

PREFETCH = 2  # batches decoded ahead of the device


class FeatureNet(Protocol):
    """A feature network: its space (`evaluation.spaces`), identity, and features of a batch."""

    space: str

    @property
    def identity(self) -> dict: ...

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class SetFeatures:
    """float32 features (N, D) of one set by key: pool_3 (2048), spatial (17 * 17 * 7 = 2023),
    dinov2 (1024 for ViT-L), those of the networks that ran."""

    features: dict[str, np.ndarray]
    seconds: float
    image_shape: tuple[int, ...] | None = None  # (H, W, 3) of the images

    @property
    def count(self) -> int:
        return len(next(iter(self.features.values())))

    @property
    def images_per_s(self) -> float:
        return self.count / max(self.seconds, 1e-9)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Turn TF32 off for CUDA matmuls and convolutions inside the block; restore afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def prefetched(batches: Iterator[np.ndarray], depth: int = PREFETCH) -> Iterator[np.ndarray]:
    """Yield from `batches`, produced by a background thread up to `depth` ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for batch in batches:
                q.put(batch)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)
        q.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def extract_features(
    images: ImageSet, nets: Sequence[FeatureNet], *, batch_size: int = 100, device="cpu"
) -> SetFeatures | None:
    """The features of every image of the set that could be read through every network of
    `nets` (None if none could: a folder whose files were all skipped)."""
    parts: dict[str, list[np.ndarray]] = {}
    t0, seen, shape = time.perf_counter(), 0, None
    with no_tf32(), torch.inference_mode():
        for batch in prefetched(images.batches(batch_size)):
            shape = shape or batch.shape[1:]
            if batch.shape[1:] != shape:
                raise EvaluationError(
                    f"{images.path}: images of sizes {shape} and {batch.shape[1:]}; every image "
                    "of a set must have one size"
                )
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
            for net in nets:
                for key, f in net.features(x).items():
                    parts.setdefault(key, []).append(f.float().cpu().numpy())
            seen += len(batch)
            log.debug("%s: %d of %d images", images.path, seen, images.count)
    seconds = time.perf_counter() - t0
    if not seen:
        return None
    log.info(
        "featurized %d images of %s in %.1f s (%.1f images/s)",
        seen,
        images.path,
        seconds,
        seen / max(seconds, 1e-9),
    )
    return SetFeatures(
        features={k: np.concatenate(v) for k, v in parts.items()},
        seconds=seconds,
        image_shape=None if shape is None else tuple(shape),
    )


def featurize(
    images: ImageSet, nets: Sequence[FeatureNet], *, batch_size: int = 100, device="cpu"
) -> SetFeatures | None:
    """The features of the whole set, each rank extracting its share: on rank 0, None on the
    others (one process: `extract_features`). Every rank must call it; a LatentditError of any
    rank is raised on all. `seconds` is the wall time of the slowest rank."""
    rank, world = rank_and_world()
    if world == 1:
        f = extract_features(images, nets, batch_size=batch_size, device=device)
        _require_two(images, 0 if f is None else f.count)
        return f
    part = images.share(batch_size, rank, world)
    log.info(
        "rank %d of %d: images [%d, %d) of %d in %s",
        rank,
        world,
        part.first,
        part.first + part.count,
        images.count,
        images.path,
    )
    t0 = time.perf_counter()
    mine = on_all(
        lambda: (
            extract_features(part, nets, batch_size=batch_size, device=device)
            if part.count
            else None
        )
    )
    seconds = time.perf_counter() - t0  # on_all waited for the slowest rank
    _require_two(images, sum(all_gather_objects(0 if mine is None else mine.count)))
    shapes = sorted({s for s in all_gather_objects(mine and mine.image_shape) if s is not None})
    if len(shapes) > 1:
        raise EvaluationError(
            f"{images.path}: images of sizes {shapes[0]} and {shapes[1]}; "
            "every image of a set must have one size"
        )
    keys = next(k for k in all_gather_objects(mine and sorted(mine.features)) if k)
    gathered = {k: gather_rows(mine and mine.features[k]) for k in keys}
    if rank != 0:
        return None
    return SetFeatures(features=gathered, seconds=seconds, image_shape=shapes[0])


def _require_two(images: ImageSet, read: int) -> None:
    """Statistics need two images; files skipped while reading may have left fewer."""
    if read < 2:
        raise EvaluationError(
            f"{images.path}: {read} of {images.count} image(s) could be read (see the warnings "
            "above); statistics need at least 2"
        )
