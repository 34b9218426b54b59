"""What `latentdit evaluate` reads: image sets (uint8 NHWC batches) and statistics files.

ADM .npz      arr_0 uint8 (N, H, W, 3), streamed from the zip in batches (checks: `evaluation.npz`)
reference     an ADM reference batch: arr_0 and its precomputed mu, sigma, mu_s, sigma_s
stats         a file of `--save-stats`: each space's statistics and features, no images
folder        PNG/JPEG files found recursively, decoded by DataLoader workers
sample dir    a `latentdit sample` output folder: its .npz, else its images/ PNGs
store         a latent store (a folder or URL), decoded through its VAE decoder (the
              reconstruction floor)

Image files are listed and decoded as `encode` does it (`foundation.files`,
`foundation.images`): regular files only, each once, within a size cap and a pixel budget; a file
that cannot be used (a decompression bomb, a corrupt or truncated file, a FIFO) is skipped with a
warning naming it and its reason, and counted in the set's `skipped`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from evaluation import npz
from evaluation.errors import EvaluationError
from evaluation.spaces import FEATURE_KEYS, GAUSSIANS, INCEPTION, SPACES, STATS_KEYS
from foundation.distributed import rank_range
from foundation.files import DEFAULT_MAX_FILE_MB, MB, list_regular_files, shown_path
from foundation.images import DEFAULT_MAX_PIXELS, ImageDecodeError, read_image
from foundation.urls import is_url

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ADM_STATS = ("mu", "sigma", "mu_s", "sigma_s")  # an ADM reference batch's own statistics
NETWORKS_KEY = "networks"  # a stats file's JSON {space: network identity}
LEGACY_NETWORK_KEY = "network_sha1"  # the Inception port's SHA-1, in stats files before spaces
SAMPLE_MANIFEST = "sample.json"  # written by `latentdit sample` (sampler.outputs.MANIFEST)
SAMPLE_IMAGES = "images"
STORE_MARKER = "zarr.json"


@dataclass
class ImageSet:
    """uint8 (b, H, W, 3) batches of images [first, first + count) of one image set.

    `read(batch_size, start, stop)` yields images [start, stop) in batches of batch_size from
    start (the last may be shorter); `first` is 0 but for a rank's share of the set.
    """

    kind: str
    path: Path | str  # a str for a URL
    count: int
    read: Callable[[int, int, int], Iterator[np.ndarray]]
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # a reference batch's own
    first: int = 0
    verify: Callable[[], str | None] | None = None  # integrity check: raises, or a warning
    skipped: int = 0  # files left out when listing (files that fail to decode are counted later)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """The set's images in batches of `batch_size` (the last may be shorter)."""
        return self.read(batch_size, self.first, self.first + self.count)

    def share(self, batch_size: int, rank: int, world: int) -> ImageSet:
        """Rank `rank`'s part: a contiguous run of the whole batches a one-process run cuts,
        dealt out in rank order (n // world batches or one more; none when there are fewer
        batches than ranks)."""
        mine = rank_range(math.ceil(self.count / batch_size), rank, world)
        start = self.first + mine.start * batch_size
        stop = min(self.first + mine.stop * batch_size, self.first + self.count)
        return replace(self, first=start, count=max(stop - start, 0))


def cuts(start: int, stop: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """(begin, end) of the batches of [start, stop), batch_size long from start."""
    for i in range(start, stop, batch_size):
        yield i, min(i + batch_size, stop)


def rebatch(chunks: Iterator[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Rows of successive chunks regrouped into batches of batch_size (the last may be shorter)."""
    held: list[np.ndarray] = []
    size = 0
    for chunk in chunks:
        while len(chunk):
            take = chunk[: batch_size - size]
            held.append(take)
            size, chunk = size + len(take), chunk[len(take) :]
            if size == batch_size:
                yield np.concatenate(held)
                held, size = [], 0
    if held:
        yield np.concatenate(held)


def array_images(kind: str, name: str | Path, images: np.ndarray) -> ImageSet:
    """An in-memory uint8 (N, H, W, 3) array as an image set."""

    def read(batch_size: int, start: int, stop: int) -> Iterator[np.ndarray]:
        for a, b in cuts(start, stop, batch_size):
            yield images[a:b]

    return ImageSet(kind, Path(name), len(images), read)


@dataclass
class StatsFile:
    """A statistics file: each Gaussian's mu and sigma (`evaluation.spaces`), the features when
    `--save-stats` wrote them, and the identity of the network of each space."""

    path: Path
    stats: dict[str, np.ndarray]
    features: dict[str, np.ndarray]
    networks: dict[str, dict]

    kind = "stats"

    @property
    def count(self) -> int | None:
        return len(next(iter(self.features.values()))) if self.features else None

    def spaces(self) -> list[str]:
        """The spaces this file has statistics of (all their Gaussians)."""
        return [n for n, s in SPACES.items() if all(g.mu in self.stats for g in s.gaussians)]


@dataclass(frozen=True)
class DecodeLimits:
    """How image files are read: the pixel budget and the file size cap (`foundation.images`)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_mb: float = DEFAULT_MAX_FILE_MB


def open_input(
    path: str | Path,
    *,
    limit: int | None = None,
    workers: int = 0,
    vae: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    decode: DecodeLimits = DecodeLimits(),
) -> ImageSet | StatsFile:
    """Recognize `path` by its content and open it (see the module docstring for the kinds).

    A URL (s3://...) must be a latent store; `storage_options` are its driver's options."""
    if is_url(path):
        from evaluation.store_images import open_store_images

        return open_store_images(
            str(path), limit=limit, vae=vae, device=device, storage_options=storage_options
        )
    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".npz":
            raise EvaluationError(f"{path}: not an .npz; give an .npz, an image folder or a store")
        return _open_npz(path, limit)
    if (path / STORE_MARKER).is_file():
        from evaluation.store_images import open_store_images

        return open_store_images(path, limit=limit, vae=vae, device=device)
    if (path / SAMPLE_MANIFEST).is_file():
        found = sorted(path.glob("samples_*.npz"))
        if found:
            return _open_npz(found[-1], limit, kind="sample dir")
        return _open_folder(path / SAMPLE_IMAGES, limit, workers, decode, kind="sample dir")
    return _open_folder(path, limit, workers, decode, kind="folder")


# --- .npz ---------------------------------------------------------------------------------------


def _open_npz(path: Path, limit: int | None, kind: str | None = None) -> ImageSet | StatsFile:
    zf = npz.open_zip(path)
    names = {n.removesuffix(".npy") for n in zf.namelist()}
    has_stats = any(k in names for k in STATS_KEYS)
    if has_stats and npz.IMAGES not in names:
        return _stats_file(path)
    if npz.IMAGES not in names:
        raise EvaluationError(f"{path}: no arr_0 (images) and no mu/sigma (statistics)")
    stats = _checked_stats(path, npz.load_arrays(path, ADM_STATS)) if has_stats else {}
    info, shape, dtype, header = npz.image_member(zf, path)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise EvaluationError(f"{path}: arr_0 is {dtype} {shape}; need uint8 (N, H, W, 3) images")
    if shape[0] == 0:
        raise EvaluationError(f"{path}: arr_0 holds no images")
    if 0 in shape[1:3]:
        raise EvaluationError(f"{path}: arr_0's images are {shape[2]}x{shape[1]} pixels (empty)")
    count = shape[0] if limit is None else min(limit, shape[0])
    image_bytes = int(np.prod(shape[1:]))

    def read(batch_size: int, start: int, stop: int) -> Iterator[np.ndarray]:
        with npz.member_data(zf, path, info, header) as f:
            f.seek(start * image_bytes, 1)
            for a, b in cuts(start, stop, batch_size):
                yield npz.read_rows(f, path, (b - a, *shape[1:]))

    def unchecked() -> str:  # a part of arr_0 is read: no verdict on the whole member
        return f"{path}: CRC-32 not checked (--limit reads {count} of {shape[0]} images)"

    verify = npz.member_crc_check(path, info) if count == shape[0] else unchecked
    return ImageSet(
        kind or ("reference" if stats else "npz"), path, count, read, stats, verify=verify
    )


def _stats_file(path: Path) -> StatsFile:
    arrays = npz.load_arrays(path, [*STATS_KEYS, *FEATURE_KEYS, NETWORKS_KEY, LEGACY_NETWORK_KEY])
    stats = _checked_stats(path, {k: arrays[k] for k in STATS_KEYS if k in arrays})
    features = {k: arrays[k] for k in FEATURE_KEYS if k in arrays}
    for key, f in features.items():
        width = len(stats[GAUSSIANS[key].mu]) if GAUSSIANS[key].mu in stats else f.shape[-1]
        if f.dtype.kind != "f" or f.ndim != 2 or f.shape[1] != width:
            raise EvaluationError(
                f"{path}: {key} is {f.dtype} {f.shape}, not (N, {width}) features"
            )
    networks = {}
    if NETWORKS_KEY in arrays:
        try:
            networks = json.loads(str(arrays[NETWORKS_KEY]))
        except ValueError:
            raise EvaluationError(f"{path}: its {NETWORKS_KEY} entry is not JSON") from None
    elif LEGACY_NETWORK_KEY in arrays:
        sha1 = str(arrays[LEGACY_NETWORK_KEY])
        networks = {INCEPTION: {"sha1": sha1, "fingerprint": sha1}}
    return StatsFile(path, stats, features, networks)


def _checked_stats(path: Path, stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Statistics with both halves of each Gaussian, numeric, mu (D,) and sigma (D, D)."""
    for g in GAUSSIANS.values():
        present = [k for k in (g.mu, g.sigma) if k in stats]
        if len(present) == 1:
            missing = g.sigma if present == [g.mu] else g.mu
            raise EvaluationError(f"{path}: has {present[0]} but lacks {missing}")
        if not present:
            continue
        mu, sigma = stats[g.mu], stats[g.sigma]
        if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu":
            raise EvaluationError(
                f"{path}: {g.mu}/{g.sigma} are {mu.dtype}/{sigma.dtype}, not numbers"
            )
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise EvaluationError(
                f"{path}: {g.mu} {mu.shape} and {g.sigma} {sigma.shape} are "
                "not a mean (D,) and a covariance (D, D)"
            )
    return stats


# --- image folders ------------------------------------------------------------------------------


class _Files(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], decode: DecodeLimits) -> None:
        self.files, self.decode = files, decode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | str]:
        """(i, the RGB image) or (i, why it is skipped)."""
        limits = self.decode
        try:
            max_bytes = int(limits.max_file_mb * MB)
            image = read_image(self.files[i], max_pixels=limits.max_pixels, max_bytes=max_bytes)
            return i, np.asarray(image.convert("RGB"))
        except ImageDecodeError as e:
            return i, str(e)


def _open_folder(
    folder: Path, limit: int | None, workers: int, decode: DecodeLimits, kind: str
) -> ImageSet:
    """The image files under `folder` (regular files, each once); those that fail to decode are
    skipped when read, with a warning."""

    def is_image(name: str) -> bool:
        return Path(name).suffix.lower() in IMAGE_SUFFIXES

    listing = list_regular_files(folder, keep=is_image)
    for s in listing.skipped:
        log.warning("skipping %s: %s", shown_path(s.path, folder), s.reason)
    files = listing.files[folder]
    if not files:
        raise EvaluationError(f"{folder}: no PNG or JPEG images in it (searched recursively)")
    files = files[:limit]

    def read(batch_size: int, start: int, stop: int) -> Iterator[np.ndarray]:
        part = files[start:stop]
        loader = torch.utils.data.DataLoader(
            _Files(part, decode), batch_size=batch_size, num_workers=workers, collate_fn=list
        )
        first = None
        for items in loader:
            good = []
            for i, image in items:
                if isinstance(image, str):
                    log.warning("skipping %s: %s", part[i], image)
                    continue
                first = first or (part[i], image.shape)
                if image.shape != first[1]:
                    raise EvaluationError(
                        f"{part[i]} is {image.shape[1]}x{image.shape[0]} but {first[0]} is "
                        f"{first[1][1]}x{first[1][0]}: every image of a set must have one size"
                    )
                good.append(image)
            if good:
                yield np.stack(good)

    return ImageSet(kind, folder, len(files), read, skipped=len(listing.skipped))
