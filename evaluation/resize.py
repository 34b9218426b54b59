"""The Inception graph's own input step: TF1 bilinear resize to 299 x 299, then (x - 128) / 128.

ADM's evaluator feeds float32 NHWC pixels in [0, 255] to the graph's `ExpandDims:0`; the graph
then runs `ResizeBilinear` (TF1: align_corners=False and no half-pixel centers, so output pixel i
samples input position i * in/out) and scales with `Sub` 128, `Mul` 1/128. The same arithmetic is
done here in float32 and in TF's order: along the width first (top and bottom rows), then along
the height, each as a + (b - a) * lerp.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

INCEPTION_SIZE = 299
INPUT_OFFSET = 128.0  # the graph's Sub/y
INPUT_SCALE = 1 / 128  # the graph's Mul/y (0.0078125, exact in float32)


def tf1_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower, upper, lerp) per output index of TF1's legacy bilinear resize along one axis.

    scale = in / out in float32; source = i * scale; lower = floor, upper = min(ceil, in - 1).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(src)
    upper = np.minimum(np.ceil(src), in_size - 1)
    return lower.astype(np.int64), upper.astype(np.int64), (src - lower).astype(np.float32)


def resize_tf1(x: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """Bilinear resize of float32 images (N, C, H, W) to (N, C, size, size), TF1 semantics."""
    _, _, h, w = x.shape
    if (h, w) == (size, size):
        return x
    lo_x, hi_x, lerp_x = (torch.from_numpy(a).to(x.device) for a in tf1_taps(w, size))
    lo_y, hi_y, lerp_y = (torch.from_numpy(a).to(x.device) for a in tf1_taps(h, size))
    left, right = x[..., lo_x], x[..., hi_x]
    rows = left + (right - left) * lerp_x  # (N, C, H, size)
    top, bottom = rows[..., lo_y, :], rows[..., hi_y, :]
    return top + (bottom - top) * lerp_y[:, None]


def inception_input(images: Tensor) -> Tensor:
    """The network input from uint8 images (N, H, W, 3): float32 (N, 3, 299, 299) in [-1, 1)."""
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    return (resize_tf1(x) - INPUT_OFFSET) * INPUT_SCALE
