"""Decode image bytes by content, bring every mode to 8-bit RGB, and apply the ADM center crop.

The crop is `center_crop_arr` of guided-diffusion (Dhariwal & Nichol 2021), which DiT reuses and
which the ADM reference FID statistics assume: halve with BOX while the short side is at least
twice the target, resize with BICUBIC so the short side equals the target, then cut the center
with floor rounding.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from foundation.errors import LatentditError

# Pillow's own warning threshold; an image with more pixels is treated as a decompression bomb.
DEFAULT_MAX_PIXELS = 89_478_485
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
UINT16_MAX = 65535
UINT8_MAX = 255
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message is the reason recorded in the store."""


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """How source bytes become a square uint8 RGB crop."""

    image_size: int = 256
    """Side of the square crop in pixels (256 or 512 for the ADM reference statistics)."""
    exif_transpose: bool = False
    """Apply the EXIF orientation tag. Off by default: ImageNet tooling ignores it."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels are refused as decompression bombs."""

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise LatentditError(f"--image-size must be at least 8, got {self.image_size}")
        if self.max_pixels < 1:
            raise LatentditError(f"--max-pixels must be positive, got {self.max_pixels}")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode image bytes, whatever their file name says.

    Raises ImageDecodeError with a short reason ("empty file", "not an image", "truncated ...",
    "decompression bomb ...").
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            # our own limit below decides; Pillow's warning would only add noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            pixels = img.width * img.height
            if pixels > max_pixels:
                raise ImageDecodeError(
                    f"decompression bomb: {img.width}x{img.height} = {pixels} pixels, "
                    f"over the limit of {max_pixels}"
                )
            img.load()
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognized content)") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageDecodeError):
            raise
        raise ImageDecodeError(f"corrupt image: {e}") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, each family on purpose."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        # a palette with a transparent index becomes RGBA, then is composited below
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        return to_rgb(img)
    if img.mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, UINT8_MAX))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in SIXTEEN_BIT_MODES:
        # 16-bit grayscale: scale the full range to 8 bits (rounded), never clip at 255
        wide = np.asarray(img, dtype=np.int64).clip(0, UINT16_MAX)
        gray = (wide * UINT8_MAX + UINT16_MAX // 2) // UINT16_MAX
        return Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "F":
        gray = np.asarray(img, dtype=np.float64)
        lo, hi = float(gray.min()), float(gray.max())
        gray = np.round((gray - lo) / max(hi - lo, 1e-12) * UINT8_MAX)
        return Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")
    # CMYK (Pillow undoes Adobe's inverted CMYK when decoding), L, 1, YCbCr, LAB, HSV
    return img.convert("RGB")


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
    return center_crop_adm(to_rgb(img), cfg.image_size), mode


def hflip(crop: np.ndarray) -> np.ndarray:
    """Horizontal flip of an (H, W, 3) crop."""
    return np.ascontiguousarray(crop[:, ::-1])
