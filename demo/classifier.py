"""The verdict classifier: a small CNN that names the demo class of a 32-px image.

It is trained once on generated demo images (`latentdit demo-tools train-classifier`) and
shipped in `demo/assets/classifier/` (model.safetensors + config.json). Its
penultimate layer is the feature space of the demo's Fréchet distance.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from demo import CLASSIFIER_DIR
from demo.data import as_tensor

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
BATCH = 256  # images per forward pass at inference


class Classifier(nn.Module):
    """Conv blocks (each halves the side), global average pooling, a feature layer, logits."""

    def __init__(self, *, num_classes: int, channels: Sequence[int] = (16, 32, 64),
                 feature_dim: int = 64, image_size: int = 32) -> None:  # fmt: skip
        super().__init__()
        self.config = {
            "num_classes": num_classes,
            "channels": list(channels),
            "feature_dim": feature_dim,
            "image_size": image_size,
        }
        layers, c_in = [], 3
        for c in channels:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature = nn.Sequential(nn.Linear(c_in, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> penultimate features (B, feature_dim)."""
        return self.feature(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def _batches(self, images: np.ndarray | torch.Tensor):
        if isinstance(images, np.ndarray):
            images = as_tensor(images)
        size = self.config["image_size"]
        if images.shape[-2:] != (size, size):
            raise ValueError(
                f"the classifier takes {size}x{size} images, got {tuple(images.shape)}"
            )
        return images.split(BATCH)

    @torch.no_grad()
    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Penultimate-layer features (N, feature_dim) of uint8 NHWC images (or a [-1, 1] NCHW tensor)."""
        self.eval()
        return torch.cat([self.forward_features(b) for b in self._batches(images)]).numpy()

    @torch.no_grad()
    def classify(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Predicted class indices (N,) of uint8 NHWC images (or a [-1, 1] NCHW tensor)."""
        self.eval()
        return torch.cat([self(b).argmax(1) for b in self._batches(images)]).numpy()

    def save(self, folder: Path, extra: dict | None = None) -> None:
        """Write model.safetensors and config.json (architecture, plus `extra` provenance)."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps({**self.config, **(extra or {})}, indent=2))


def load_classifier(folder: Path = CLASSIFIER_DIR) -> Classifier:
    """Load a saved classifier (config.json + model.safetensors), in eval mode."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no classifier at {folder}: retrain it with "
            f"`latentdit demo-tools train-classifier --out {folder}`"
        )
    cfg = json.loads(config_path.read_text())
    model = Classifier(
        num_classes=cfg["num_classes"],
        channels=cfg["channels"],
        feature_dim=cfg["feature_dim"],
        image_size=cfg["image_size"],
    )
    model.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return model.eval()
