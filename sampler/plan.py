"""What to make: the class of every image, and every image's own noise.

Image i (a global index) draws all its noise, the starting latent and any solver noise, from its
own generator seeded by (seed, i), so it comes out the same in any batch, alone or in a crowd.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sampler.errors import SamplerError


def resolve_class(value: str, classes: Sequence[Mapping[str, Any]]) -> int:
    """A class index from an index ("207"), an id (a wnid, "n02099601") or a name ("golden retriever").

    Names match case-insensitively, with "_" as " ", the whole name or one of its comma-separated
    synonyms ("tench, Tinca tinca").
    """
    if value.strip().isdigit():
        index = int(value)
        if index < len(classes):
            return index
        raise SamplerError(
            f"--class {value}: index out of range; the checkpoint has classes 0..{len(classes) - 1}"
        )

    def key(name: str) -> str:  # case, spaces and underscores do not matter
        return " ".join(name.replace("_", " ").casefold().split())

    wanted = key(value)
    for c in classes:
        names = [c["id"], c.get("name", ""), *c.get("name", "").split(",")]
        if wanted in (key(n) for n in names if n.strip()):
            return int(c["index"])
    example = classes[0]
    raise SamplerError(
        f"--class {value!r}: no class has this index, id or name; give an index "
        f"0..{len(classes) - 1}, an id like {example['id']!r} or a name like "
        f"{example.get('name') or example['id']!r}"
    )


def plan_labels(
    *,
    classes: Sequence[Mapping[str, Any]],
    requested: Sequence[str],
    n: int,
    fid_samples: int | None,
    seed: int,
) -> np.ndarray:
    """Labels (N,) int64 of the images to make, in order.

    - fid_samples: exactly fid_samples / num_classes per class, interleaved (label = i mod K),
      so every prefix is as balanced as it can be;
    - requested classes: n images of each, in the order given;
    - neither: n images of classes drawn uniformly with `seed`.
    """
    k = len(classes)
    if fid_samples is not None:
        if fid_samples % k:
            raise SamplerError(
                f"--fid-samples {fid_samples} is not a multiple of the {k} classes; use a multiple "
                f"such as {max(1, fid_samples // k) * k}"
            )
        return np.arange(fid_samples, dtype=np.int64) % k
    if requested:
        return np.repeat([resolve_class(c, classes) for c in requested], n).astype(np.int64)
    return np.random.default_rng([seed, k]).integers(0, k, size=n, dtype=np.int64)


def to_device(host: Tensor, device: torch.device | str) -> Tensor:
    """`host` on `device`; to CUDA through pinned memory without waiting (a pageable copy would
    wait for every queued kernel, e.g. the previous batch's decoder, before the next is queued)."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def image_seed(seed: int, index: int) -> int:
    """The 64-bit generator seed of image `index` in a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


class ImageNoise:
    """Standard normal noise for a batch, each row drawn on the CPU from its image's generator.

    Call it with a tensor to get noise shaped, typed and placed like it (the solvers' `noise=`);
    drawn in float64 for a float64 tensor (REPA's SDE state), else in float32.
    """

    def __init__(self, seed: int, indices: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(image_seed(seed, i)) for i in indices]

    def __call__(self, like: Tensor) -> Tensor:
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32  # float64: REPA's
        rows = [torch.randn(like.shape[1:], generator=g, dtype=dtype) for g in self.generators]
        return to_device(torch.stack(rows), like.device).to(like.dtype)

    def initial(self, shape: Sequence[int], device: torch.device | str) -> Tensor:
        """The starting latents (B, *shape), float32."""
        return self(torch.empty(len(self.generators), *shape, device=device))


class FileNoise(ImageNoise):
    """ImageNoise whose starting latents are given rows of an array (`--noise FILE.npy`).

    For side-by-side runs with another implementation: image i starts from row i - first of the
    file; noise drawn during sampling still comes from each image's own generator.
    """

    def __init__(self, rows: np.ndarray, seed: int, indices: Sequence[int]) -> None:
        super().__init__(seed, indices)
        self.rows = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))

    def initial(self, shape: Sequence[int], device: torch.device | str) -> Tensor:
        if tuple(self.rows.shape[1:]) != tuple(shape):
            raise SamplerError(
                f"--noise rows are {tuple(self.rows.shape[1:])}, the model's latents {tuple(shape)}"
            )
        return to_device(self.rows, device)
