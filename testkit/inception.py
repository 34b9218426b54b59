"""A tiny stand-in for the Inception-v3 port `evaluation` loads (a TorchScript file)."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path


def make_tiny_inception(path: Path, *, logits: bool = False, seed: int = 0) -> Path:
    """A TorchScript file shaped like an Inception-v3 port (`layers` with the TF graph's child
    names, mixed_6.conv; `output` with 1008 logits if asked), 64-d pool features, random weights:
    cheap stand-in for the real network (tests of sizes, kinds and formulas, not of values)."""
    import torch
    from torch import nn

    class Mixed(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU())
            self.tower = nn.Conv2d(channels, channels, 3, padding=1)

        def forward(self, x):
            return torch.cat([self.conv(x), self.tower(x)], 1)

    class Port(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(3, 8, 8, stride=8), mixed_5=nn.AdaptiveAvgPool2d(4),
                mixed_6=Mixed(8), mixed_10=nn.Conv2d(16, 64, 1), pool2=nn.AdaptiveAvgPool2d(1),
            ))  # fmt: skip
            self.output = nn.Linear(64, 1008) if logits else None

        def forward(self, x):
            return self.layers(x).flatten(1)

    torch.manual_seed(seed)
    with warnings.catch_warnings():  # the real ports are TorchScript files: so is this one
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Port().eval()).save(str(path))
    return path
