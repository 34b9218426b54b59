"""What the sampler writes: PNGs, a grid, the ADM `.npz` (the run manifest: `sampler.manifest`).

    OUT/sample.json                         the settings that determine the images (`sampler.manifest`)
    OUT/images/000017-n01440764-seed0.png   one PNG per image: index, class id, run seed
    OUT/grid.png                            the first images in a grid
    OUT/npz_parts/0000000-0000256.npy       uint8 (n, H, W, 3) per finished batch (with --npz)
    OUT/samples_50000x256x256x3.npz         the ADM evaluator's format: uint8 NHWC under arr_0
    OUT/latent_parts/0000000-0000256.npy    float32 (n, C, h, w) latents per batch (--save-latents)
    OUT/latents.npy                         all of them in index order, as the VAE decoder takes them

Every file is written under a temporary name, flushed and renamed (`foundation.atomic`), so a kill
or a full disk leaves it whole or absent. A part file is the completion marker of its images; the
final `.npz` is streamed from the parts in index order with a fixed zip timestamp, so an
interrupted and resumed run writes the same bytes as an uninterrupted one. A part is read only as
the plain array it must be: an object array (a pickle) is refused in one line, never loaded.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from einops import rearrange
from numpy.lib import format as npy_format
from PIL import Image

from foundation.atomic import atomic_file, remove_temps
from foundation.faults import doing
from foundation.locks import Lock
from sampler.errors import SamplerError

log = logging.getLogger(__name__)

MANIFEST = "sample.json"
IMAGES = "images"
PARTS = "npz_parts"
LATENT_PARTS, LATENTS = "latent_parts", "latents.npy"
GRID = "grid.png"
OUT_LOCK = ".lock"
GRID_MAX = 64  # images in the grid
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed zip entry time: same bytes on every run
PART_RE = re.compile(r"(\d+)-(\d+)\.npy")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "class"


def png_path(out: Path, index: int, class_id: str, seed: int) -> Path:
    return out / IMAGES / f"{index:06d}-{_safe(class_id)}-seed{seed}.png"


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) image atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        Image.fromarray(image).save(f, format="PNG")


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def make_grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """Tile uint8 (N, H, W, 3) images into one about-square uint8 image, white between tiles."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tiles = np.full((rows * cols, *images.shape[1:]), 255, dtype=np.uint8)
    tiles[:n] = images
    tiles = np.pad(tiles, ((0, 0), (0, pad), (0, pad), (0, 0)), constant_values=255)
    grid = rearrange(tiles, "(r c) h w ch -> (r h) (c w) ch", r=rows, c=cols)
    return grid[:-pad, :-pad]


# --- the ADM .npz, written incrementally ----------------------------------------------------------


def npz_path(out: Path, count: int, image_shape: tuple[int, int, int]) -> Path:
    return out / f"samples_{count}x{'x'.join(map(str, image_shape))}.npz"


def done_parts(out: Path, parts: str = PARTS) -> list[tuple[int, int]]:
    """[start, stop) index ranges of the finished parts, sorted."""
    folder = out / parts
    if not folder.is_dir():
        return []
    found = (PART_RE.fullmatch(p.name) for p in folder.iterdir())
    return sorted((int(m[1]), int(m[2])) for m in found if m)


def write_part(out: Path, start: int, images: np.ndarray, parts: str = PARTS) -> None:
    """Save images (uint8) or latents (float32) of indices [start, start + len) as one part."""
    folder = out / parts
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{start:07d}-{start + len(images):07d}.npy"
    with doing(f"writing {final}"), atomic_file(final) as f:
        np.save(f, np.ascontiguousarray(images, dtype=PART_DTYPES[parts]), allow_pickle=False)


PART_DTYPES = {PARTS: np.dtype(np.uint8), LATENT_PARTS: np.dtype(np.float32)}
HEADER_READERS = {
    (1, 0): npy_format.read_array_header_1_0,
    (2, 0): npy_format.read_array_header_2_0,
}
NPY_HEADER_MAX = 10_000  # numpy's own default: a header is a short dict literal


def part_problem(path: Path, rows: int, dtype: np.dtype) -> str | None:
    """Why a part file is not `rows` plain `dtype` rows (read from its header only), or None."""
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            read_header = HEADER_READERS.get(version)
            if read_header is None:
                raise ValueError(f".npy version {version} is not one np.save writes here")
            shape, _, found = read_header(f, max_header_size=NPY_HEADER_MAX)
            data_start = f.tell()
    except (OSError, ValueError, SyntaxError) as e:
        return f"is not a .npy array ({str(e).splitlines()[0] if str(e) else e!r})"
    if found.hasobject:
        return "holds an object array (a pickle)"
    if found != dtype or not shape or shape[0] != rows:
        return f"holds {found}{shape}, not {rows} rows of {dtype}"
    if path.stat().st_size < data_start + int(np.prod(shape)) * found.itemsize:
        return "is cut short"
    return None


def check_parts(out: Path, parts: str = PARTS) -> list[Path]:
    """The finished part files, each checked from its header: anything but plain rows of the
    part's dtype is one SamplerError line (a resume refuses it before making anything)."""
    paths = []
    for start, stop in done_parts(out, parts):
        path = out / parts / f"{start:07d}-{stop:07d}.npy"
        if (why := part_problem(path, stop - start, PART_DTYPES[parts])) is not None:
            raise SamplerError(
                f"{path} {why}; refused (never unpickled): remove it and re-run the same "
                "command to make those images again"
            )
        paths.append(path)
    return paths


def read_parts(out: Path, parts: str = PARTS) -> Iterable[tuple[int, np.ndarray]]:
    """(first index, array) of each finished part in index order, checked (`check_parts`)."""
    for path in check_parts(out, parts):
        yield int(path.name[:7]), np.load(path, mmap_mode="r", allow_pickle=False)


def out_lock(out: Path) -> Lock:
    """The lock of a sample folder (not taken yet): one `latentdit sample` writes it at a time."""
    return Lock(out / OUT_LOCK, what=f"sample folder {out}")


def clear_temps(out: Path) -> None:
    """Remove what killed writers left (temporary files); call while holding `out_lock`."""
    for folder in (out, out / IMAGES, out / PARTS, out / LATENT_PARTS):
        for path in remove_temps(folder):
            log.info("removed %s, left by an interrupted write", path)


def _check_covered(out: Path, parts: str, first: int, count: int) -> None:
    """Refuse unless the finished parts cover exactly [first, first + count)."""
    expected = first
    for start, stop in done_parts(out, parts):
        if start != expected:
            raise SamplerError(f"{out / parts}: images {expected}..{start - 1} are missing")
        expected = stop
    if expected != first + count:
        raise SamplerError(f"{out / parts}: images {expected}..{first + count - 1} are missing")


def assemble_latents(out: Path, first: int, count: int) -> Path:
    """Join the latent parts covering [first, first + count) into OUT/latents.npy; remove them."""
    _check_covered(out, LATENT_PARTS, first, count)
    parts = [np.asarray(a) for _, a in read_parts(out, LATENT_PARTS)]
    final = out / LATENTS
    with atomic_file(final) as f:
        np.save(f, np.concatenate(parts), allow_pickle=False)
    shutil.rmtree(out / LATENT_PARTS)
    return final


def assemble_npz(out: Path, first: int, count: int, image_shape: tuple[int, int, int]) -> Path:
    """Stream the parts covering [first, first + count) into the ADM `.npz`; remove the parts.

    The zip entry `arr_0.npy` is written like `np.savez` writes it, without holding all images in
    memory (50k images at 256 px are 9.8 GB).
    """
    _check_covered(out, PARTS, first, count)
    final = npz_path(out, count, image_shape)
    header = {"descr": "|u1", "fortran_order": False, "shape": (count, *image_shape)}
    info = zipfile.ZipInfo("arr_0.npy", date_time=ZIP_EPOCH)
    with (
        doing(f"writing {final}"),
        atomic_file(final) as file,  # a full disk: no .npz, the parts as they were
        zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
        zf.open(info, "w", force_zip64=True) as f,
    ):
        npy_format.write_array_header_1_0(f, header)
        for _, images in read_parts(out):
            f.write(np.ascontiguousarray(images).tobytes())
    shutil.rmtree(out / PARTS)
    return final
