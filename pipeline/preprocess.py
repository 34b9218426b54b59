"""Decode image bytes by content, bring every mode to 8-bit RGB, and apply the ADM center crop.

The crop is `center_crop_arr` of guided-diffusion (Dhariwal & Nichol 2021), which DiT reuses and
which the ADM reference FID statistics assume: halve with BOX while the short side is at least
twice the target, resize with BICUBIC so the short side equals the target, then cut the center
with floor rounding.

Decoding is bounded (`foundation.images.decode_image`: a budget of pixels weighted by bit depth,
checked on the header), and the conversions of wide samples (16-bit, 32-bit, float) to 8 bits run
over bands of rows, so a worker holds the decoded image, its 8-bit copy and one band at most.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from foundation.errors import LatentditError
from foundation.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image

__all__ = ["DEFAULT_MAX_PIXELS", "ImageDecodeError", "PreprocessConfig", "decode_image"]
__all__ += ["center_crop_adm", "hflip", "preprocess", "to_rgb"]

ROWS_PER_BAND = 2**20  # pixels converted at a time from wide samples (int64: 8 MB per band)
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
UINT16_MAX = 65535
UINT8_MAX = 255
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """How source bytes become a square uint8 RGB crop."""

    image_size: int = 256
    """Side of the square crop in pixels (256 or 512 for the ADM reference statistics)."""
    exif_transpose: bool = False
    """Apply the EXIF orientation tag. Off by default: ImageNet tooling ignores it."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels (weighted by bit depth: `foundation.images`) are refused as
    decompression bombs."""

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise LatentditError(f"--image-size must be at least 8, got {self.image_size}")
        if self.max_pixels < 1:
            raise LatentditError(f"--max-pixels must be positive, got {self.max_pixels}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, each family on purpose."""
    img = to_8bit(img)
    return img.convert("RGB") if img.mode == "L" else img


def to_8bit(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit "L" (the gray families: L, 16-bit, 32-bit, float) or "RGB".

    The crop of an "L" image equals each channel of the crop of its RGB copy (the resampling
    is per channel), so gray images are cropped before they take three bands.
    """
    if img.mode in ("RGB", "L"):
        return img
    if img.mode == "P":
        # a palette with a transparent index becomes RGBA, then is composited below
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        return to_8bit(img)
    if img.mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, UINT8_MAX))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in SIXTEEN_BIT_MODES:
        # 16-bit grayscale: scale the full range to 8 bits (rounded), never clip at 255
        def scale(band: np.ndarray) -> np.ndarray:
            wide = band.astype(np.int64).clip(0, UINT16_MAX)
            return (wide * UINT8_MAX + UINT16_MAX // 2) // UINT16_MAX

        return _to_gray(img, scale)
    if img.mode == "F":
        lo, hi = np.inf, -np.inf
        for band in _row_bands(img):  # np.min/np.max: a NaN anywhere propagates, as before
            a = np.asarray(band)
            lo, hi = float(np.min([lo, a.min()])), float(np.max([hi, a.max()]))
        span = max(hi - lo, 1e-12)
        return _to_gray(img, lambda b: np.round((b.astype(np.float64) - lo) / span * UINT8_MAX))
    # CMYK (Pillow undoes Adobe's inverted CMYK when decoding), 1, YCbCr, LAB, HSV
    return img.convert("RGB")


def _row_bands(img: Image.Image):
    """The image cut into bands of whole rows of about ROWS_PER_BAND pixels, top to bottom."""
    rows = max(1, ROWS_PER_BAND // max(img.width, 1))
    for top in range(0, img.height, rows):
        yield img.crop((0, top, img.width, min(top + rows, img.height)))


def _to_gray(img: Image.Image, scale) -> Image.Image:
    """An 8-bit "L" image of `img`: each band of rows mapped by `scale` (numpy, to 0..255)."""
    gray = Image.new("L", img.size)
    rows = max(1, ROWS_PER_BAND // max(img.width, 1))
    for i, band in enumerate(_row_bands(img)):
        gray.paste(Image.fromarray(scale(np.asarray(band)).astype(np.uint8)), (0, i * rows))
    return gray


def center_crop_adm(img: Image.Image, size: int) -> np.ndarray:
    """The ADM / DiT center crop of an RGB image: uint8 (size, size, 3)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def preprocess(data: bytes, cfg: PreprocessConfig) -> tuple[np.ndarray, str]:
    """Bytes to the uint8 (H, W, 3) crop; also returns the decoded image's original mode."""
    img = decode_image(data, max_pixels=cfg.max_pixels)
    mode = img.mode
    if cfg.exif_transpose:
        img = ImageOps.exif_transpose(img)
    eight = to_8bit(img)
    del img  # the decoded image (maybe 16-bit) is not held while the crop halves the 8-bit one
    crop = center_crop_adm(eight, cfg.image_size)
    return (np.repeat(crop[..., None], 3, axis=2) if crop.ndim == 2 else crop), mode


def hflip(crop: np.ndarray) -> np.ndarray:
    """Horizontal flip of an (H, W, 3) crop."""
    return np.ascontiguousarray(crop[:, ::-1])
