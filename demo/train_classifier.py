"""Train the verdict classifier on generated demo images and save it beside the demo VAE.

    latentdit demo-tools train-classifier --out demo/assets/classifier

Trained on real (generated, JPEG) demo images from a data seed other than the demo's, with a
random blur as augmentation so that a slightly soft image (as a VAE decodes it) is still judged
by its shape. The held-out accuracy goes into config.json with the recipe.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict

import torch
from torch.nn import functional as F

from demo.classifier import Classifier
from demo.config import ClassifierTrainConfig
from demo.data import CLASSES, as_tensor, generate_training_arrays
from demo.training import optimizer_step

log = logging.getLogger(__name__)

MAX_BLUR_SIGMA = 1.2  # pixels; the augmentation blurs half the images by sigma ~ U(0, this)


def random_blur(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur half of the images (B, 3, H, W) with a Gaussian of random sigma in (0, MAX_BLUR_SIGMA)."""
    out = x.clone()
    for i in torch.nonzero(torch.rand(len(x), generator=gen) < 0.5).flatten().tolist():
        sigma = max(float(torch.rand((), generator=gen)) * MAX_BLUR_SIGMA, 0.1)
        r = math.ceil(2 * sigma)
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
        k = (k / k.sum()).repeat(3, 1, 1)  # (3, 1, taps): one kernel per channel
        y = F.conv2d(F.pad(x[i : i + 1], (r, r, 0, 0), mode="replicate"), k[:, :, None], groups=3)
        out[i] = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k[:, :, :, None], groups=3)[0]
    return out


def train_classifier(config: ClassifierTrainConfig) -> dict:
    """Train, measure held-out accuracy, save; returns the metrics."""
    torch.manual_seed(config.seed)
    data = generate_training_arrays(
        config.image_size, config.train_per_class, config.val_per_class, config.data_seed
    )
    x, y = as_tensor(data["train"][0]), torch.from_numpy(data["train"][1])
    model = Classifier(num_classes=len(CLASSES), image_size=config.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps)
    gen = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(config.steps):
        idx = torch.randint(len(x), (config.batch_size,), generator=gen)
        loss = F.cross_entropy(model(random_blur(x[idx], gen)), y[idx])
        optimizer_step(
            opt, sched, loss, step, config.steps, batch_size=config.batch_size, started=t0
        )
    val_images, val_labels = data["val"]
    metrics = {
        "val_accuracy": float((model.classify(val_images) == val_labels).mean()),
        "val_images": len(val_labels),
        "train_seconds": time.perf_counter() - t0,
    }
    recipe = {k: v for k, v in asdict(config).items() if k != "out"}
    model.save(
        config.out,
        extra={"classes": [c.id for c in CLASSES], "training": recipe, "metrics": metrics},
    )
    log.info("saved %s: %s", config.out, metrics)
    return metrics
