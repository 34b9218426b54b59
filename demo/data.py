"""The demo's image set: ten generated classes of shapes and textures in the ImageNet layout.

    latentdit demo-tools data --out demo_out/data

Writes `train/<wnid>/<wnid>_<i>.JPEG`, a held-out `val/<wnid>/` split in the same class-folder
layout, and `LOC_synset_mapping.txt` ("<wnid> <name>" per line, as in the Kaggle ImageNet set).
A class is a shape or texture in its own family of hues (disks are red, squares orange, ...);
the exact color, position, size, rotation and background are drawn at random.
Every image is a pure function of (seed, split, class, index): the same seed gives the same bytes.
"""

from __future__ import annotations

import colorsys
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from demo.config import DemoDataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
SYNSET_FILE = "LOC_synset_mapping.txt"
SUPERSAMPLE = 4  # draw at 4x, then downscale with a box filter: anti-aliased edges
NOISE_STD = 4.0  # grain added to every image, in 8-bit levels
HUE_JITTER = 0.025  # of the class hue, in turns of the color wheel (9 degrees)

Color = tuple[int, int, int]
Painter = Callable[[ImageDraw.ImageDraw, int, np.random.Generator, Color, Color], None]


def _hsv(h: float, s: float, v: float) -> Color:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _colors(class_index: int, rng: np.random.Generator) -> tuple[Color, Color]:
    """(foreground, background): a bright color of the class's hue family on a dark background.

    Class c's hue is c / 10 of the color wheel (+- HUE_JITTER); the background's hue is free.
    """
    h = class_index / len(CLASSES) + rng.uniform(-HUE_JITTER, HUE_JITTER)
    fg = _hsv(h, rng.uniform(0.65, 1.0), rng.uniform(0.8, 1.0))
    return fg, _hsv(rng.uniform(), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.4))


def _placement(size: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Center (x, y) and radius of a shape: radius 18-36% of the image, fully inside it."""
    r = rng.uniform(0.18, 0.36) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    return cx, cy, r


def _polygon(cx: float, cy: float, r: float, corners: int, angle: float) -> list[tuple]:
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / corners),
         cy + r * math.sin(angle + 2 * math.pi * k / corners))
        for k in range(corners)
    ]  # fmt: skip


def _bar_cross(draw, size, rng, fg, angle) -> None:
    cx, cy, r = _placement(size, rng)
    w = r * rng.uniform(0.25, 0.4)
    for a in (angle, angle + math.pi / 2):
        dx, dy = math.cos(a), math.sin(a)
        px, py = -dy * w, dx * w
        draw.polygon(
            [(cx - r * dx + px, cy - r * dy + py), (cx + r * dx + px, cy + r * dy + py),
             (cx + r * dx - px, cy + r * dy - py), (cx - r * dx - px, cy - r * dy - py)],
            fill=fg,
        )  # fmt: skip


def _jitter(rng: np.random.Generator) -> float:
    """A small rotation (+-10 degrees), in radians: orientation stays part of the class."""
    return math.radians(rng.uniform(-10, 10))


def paint_disk(draw, size, rng, fg, bg) -> None:
    cx, cy, r = _placement(size, rng)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)


def paint_square(draw, size, rng, fg, bg) -> None:
    cx, cy, r = _placement(size, rng)
    draw.polygon(_polygon(cx, cy, r, 4, math.pi / 4 + _jitter(rng)), fill=fg)


def paint_triangle(draw, size, rng, fg, bg) -> None:
    cx, cy, r = _placement(size, rng)
    draw.polygon(_polygon(cx, cy, r, 3, -math.pi / 2 + _jitter(rng)), fill=fg)


def paint_ring(draw, size, rng, fg, bg) -> None:
    cx, cy, r = _placement(size, rng)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    ri = r * rng.uniform(0.45, 0.6)
    draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=bg)


def paint_plus(draw, size, rng, fg, bg) -> None:
    _bar_cross(draw, size, rng, fg, _jitter(rng))


def paint_x(draw, size, rng, fg, bg) -> None:
    _bar_cross(draw, size, rng, fg, math.pi / 4 + _jitter(rng))


def _stripes(draw, size, rng, fg, vertical: bool) -> None:
    period = rng.uniform(0.2, 0.3) * size
    width = period * rng.uniform(0.4, 0.6)
    pos = -rng.uniform(0, period)
    while pos < size:
        box = (pos, 0, pos + width, size) if vertical else (0, pos, size, pos + width)
        draw.rectangle(box, fill=fg)
        pos += period


def paint_hstripes(draw, size, rng, fg, bg) -> None:
    _stripes(draw, size, rng, fg, vertical=False)


def paint_vstripes(draw, size, rng, fg, bg) -> None:
    _stripes(draw, size, rng, fg, vertical=True)


def paint_checker(draw, size, rng, fg, bg) -> None:
    cell = rng.uniform(0.16, 0.24) * size
    ox, oy = -rng.uniform(0, 2 * cell, size=2)
    for i in range(int(size / cell) + 3):
        for j in range(int(size / cell) + 3):
            if (i + j) % 2 == 0:
                x, y = ox + i * cell, oy + j * cell
                draw.rectangle((x, y, x + cell, y + cell), fill=fg)


def paint_dots(draw, size, rng, fg, bg) -> None:
    step = rng.uniform(0.24, 0.32) * size
    r = step * rng.uniform(0.22, 0.32)
    ox, oy = -rng.uniform(0, step, size=2)
    for i in range(int(size / step) + 3):
        for j in range(int(size / step) + 3):
            x, y = ox + (i + 0.5) * step, oy + (j + 0.5) * step
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fg)


@dataclass(frozen=True)
class DemoClass:
    """One demo class: its wnid-like id, its human name and the function that draws it."""

    id: str
    name: str
    paint: Painter


# Made-up wnid-like ids ("d" + 7 digits) in sorted order, so class index = position (DESIGN.md).
CLASSES: tuple[DemoClass, ...] = tuple(
    DemoClass(id=f"d{i + 1:07d}", name=name, paint=paint)
    for i, (name, paint) in enumerate(
        [
            ("disk", paint_disk),
            ("square", paint_square),
            ("triangle", paint_triangle),
            ("ring", paint_ring),
            ("plus", paint_plus),
            ("x cross", paint_x),
            ("horizontal stripes", paint_hstripes),
            ("vertical stripes", paint_vstripes),
            ("checkerboard", paint_checker),
            ("polka dots", paint_dots),
        ]
    )
)


def _background(size: int, rng: np.random.Generator, bg: Color) -> Image.Image:
    """A flat color, or a linear gradient from it to a nearby shade, in a random direction."""
    base = np.array(bg, dtype=np.float32)
    other = np.clip(base + rng.uniform(-50, 50, size=3), 0, 255)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    a = rng.uniform(0, 2 * math.pi)
    ramp = np.cos(a) * t[None, :] + np.sin(a) * t[:, None]
    ramp = ((ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6))[..., None]  # in [0, 1]
    pixels = base + rng.uniform(0, 1) * ramp * (other - base)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def render(class_index: int, *, size: int, seed: int, split: str, index: int) -> Image.Image:
    """Draw image `index` of class `class_index` in `split`: RGB, `size` x `size` pixels."""
    rng = np.random.default_rng([seed, SPLITS.index(split), class_index, index])
    fg, bg = _colors(class_index, rng)
    big = size * SUPERSAMPLE
    img = _background(big, rng, bg)
    CLASSES[class_index].paint(ImageDraw.Draw(img), big, rng, fg, bg)
    img = img.resize((size, size), Image.Resampling.BOX)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, NOISE_STD, (size, size, 3))
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


def image_path(root: Path, split: str, class_index: int, index: int) -> Path:
    wnid = CLASSES[class_index].id
    return root / split / wnid / f"{wnid}_{index}.JPEG"


def make_demo_data(config: DemoDataConfig) -> Path:
    """Write the demo image set under `config.out`; returns `config.out`."""
    counts = {"train": config.train_per_class, "val": config.val_per_class}
    for split, n in counts.items():
        for c in range(len(CLASSES)):
            image_path(config.out, split, c, 0).parent.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = render(c, size=config.image_size, seed=config.seed, split=split, index=i)
                img.save(image_path(config.out, split, c, i), "JPEG", quality=config.quality)
    write_synsets(config.out / SYNSET_FILE)
    log.info(
        "demo data: %d classes x (%d train + %d val) images of %d px in %s",
        len(CLASSES),
        config.train_per_class,
        config.val_per_class,
        config.image_size,
        config.out,
    )
    return config.out


def write_synsets(path: Path) -> None:
    """The class list in the LOC_synset_mapping.txt format: '<wnid> <name>' per line."""
    path.write_text("".join(f"{c.id} {c.name}\n" for c in CLASSES))


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a split back: uint8 images (N, H, W, 3) and int64 labels (N,), class-sorted order."""
    images, labels = [], []
    for c, cls in enumerate(CLASSES):
        files = sorted((root / split / cls.id).glob("*.JPEG"), key=lambda p: p.stem)
        for f in files:
            with Image.open(f) as img:
                images.append(np.asarray(img.convert("RGB")))
            labels.append(c)
    if not images:
        raise FileNotFoundError(f"no demo images under {root / split}: run make_demo_data first")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def generate_arrays(config: DemoDataConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Generate a demo set (JPEG round trip included) and load each split as (images, labels)."""
    make_demo_data(config)
    return {split: load_split(config.out, split) for split in SPLITS}


def generate_training_arrays(
    image_size: int, train_per_class: int, val_per_class: int, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`generate_arrays` in a temporary folder: the images a shipped asset is trained on."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return generate_arrays(
            DemoDataConfig(
                out=Path(tmp),
                image_size=image_size,
                train_per_class=train_per_class,
                val_per_class=val_per_class,
                seed=seed,
            )
        )


def as_tensor(images: np.ndarray):
    """uint8 images (N, H, W, 3) -> float32 torch (N, 3, H, W) in [-1, 1], the VAE's input range."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
