"""Decode image files within a budget: the one policy `encode` and `evaluate` both apply.

    image = decode_image(data, max_pixels=DEFAULT_MAX_PIXELS)   # or ImageDecodeError(reason)
    image = read_image(path, max_pixels=..., max_bytes=...)     # a file, read with a size cap

A header says an image's size and mode before any pixel is decoded, so a decompression bomb is
refused before it takes memory: its pixels are counted against `max_pixels`, weighted by what
one pixel holds beyond an 8-bit RGB one (Pillow's own bomb limit assumes 8-bit samples):

    cost = width x height x bytes per sample x max(1, bands / 3)

A 16-bit image counts twice its pixels, a 32-bit integer or float one four times, an RGBA or
CMYK one 4/3 times. A 160 KB 16-bit PNG of 80M pixels (161 MB once decoded, 1.8 GB through the
old conversions) is refused in a few milliseconds by the default, Pillow's 89.5M-pixel limit.
The caller skips what is refused and logs the reason; nothing here crashes on a bad file.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageMode

from foundation.files import FileRefusedError, read_regular_file

# Pillow's own warning threshold for 8-bit images; weighted costs above it are refused.
DEFAULT_MAX_PIXELS = 89_478_485
RGB_BANDS = 3


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message is the reason a caller records or logs."""


def pixel_cost(size: tuple[int, int], mode: str) -> int:
    """The pixels an image of `size` and Pillow `mode` counts against the budget (see above)."""
    desc = ImageMode.getmode(mode)
    sample_bytes = np.dtype(desc.typestr).itemsize
    return size[0] * size[1] * sample_bytes * max(RGB_BANDS, len(desc.bands)) // RGB_BANDS


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode image bytes, whatever their file name says, within the budget.

    Raises ImageDecodeError with a short reason ("empty file", "not an image", "corrupt ...",
    "decompression bomb ...").
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            # our own limit below decides; Pillow's warning would only add noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            cost = pixel_cost(img.size, img.mode)
            if cost > max_pixels:
                raise ImageDecodeError(_bomb(img, cost, max_pixels))
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


def _bomb(img: Image.Image, cost: int, max_pixels: int) -> str:
    pixels = img.width * img.height
    weighted = f" (weighted for {img.mode}: {cost})" if cost != pixels else ""
    return (
        f"decompression bomb: {img.width}x{img.height} = {pixels} pixels{weighted}, "
        f"over the limit of {max_pixels} (--max-pixels)"
    )


def read_image(path: str | os.PathLike, *, max_pixels: int, max_bytes: int) -> Image.Image:
    """Read a regular file of at most `max_bytes` and decode it within the budget; every
    refusal is an ImageDecodeError whose message is the reason."""
    try:
        return decode_image(read_regular_file(path, max_bytes=max_bytes), max_pixels=max_pixels)
    except FileRefusedError as e:
        raise ImageDecodeError(str(e)) from None
    except OSError as e:
        raise ImageDecodeError(f"unreadable: {e.strerror or e}") from None
