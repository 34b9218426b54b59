"""Train the demo's image encoder, a small DINOv2, and save it with save_pretrained.

    latentdit demo-tools train-encoder --out demo/assets/encoder

The encoder is what `latentdit encode ... --features demo/assets/encoder` stores tokens of, for
REPA on the demo: a `transformers` Dinov2Model (4 blocks of width 64, 8-px patches: a 32-px
image is a 4x4 grid, the grid DiT-S/2 sees on the demo VAE's 8x8 latents), loaded through the
same `AutoModel.from_pretrained` path as `facebook/dinov2-base`, and trained here through the
same preprocessing and forward as the encode job (`pipeline.features.FeatureEncoder`).

Objective, on generated images of data seed 3 (the demo's images are seed 0, the VAE's 1, the
verdict classifier's 2): a linear head names the demo class from the class token, and the same
head from every patch token, so that the patch tokens REPA aligns with carry what the image is,
not only the class token; and a linear read-out of each patch token gives back its own 8x8
pixels, so that they keep what is where (without it, every token of an image could collapse to
its class). Why not self-supervised (DINO's self-distillation): it
needs multi-crop views, a teacher and many more steps than a CPU minute, and it can collapse;
for ten synthetic classes the labels are the cheapest route to semantic tokens. Why not the
verdict classifier: it judges the samples, and a DiT aligned with its features would be tuned to
its judge. The read-outs are dropped (REPA drops DINOv2's head); `training.json` holds the recipe
and the held-out figures.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict

import torch
from torch.nn import functional as F

from demo.config import EncoderTrainConfig
from demo.data import CLASSES, generate_training_arrays
from demo.training import optimizer_step, warmup_cosine
from pipeline.features import ENCODER_KINDS, IMAGENET_MEAN, IMAGENET_STD, FeatureEncoder

log = logging.getLogger(__name__)

TRAINING_FILE = "training.json"


def build_encoder(config: EncoderTrainConfig) -> FeatureEncoder:
    """A fresh Dinov2Model behind the encode job's preprocessing (x / 255, ImageNet mean/std)."""
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(
        Dinov2Config(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.depth,
            num_attention_heads=config.num_heads,
            patch_size=config.patch_size,
            image_size=config.image_size,
        )
    )
    return FeatureEncoder(
        model,
        kind=ENCODER_KINDS["dinov2"],
        grid=config.image_size // config.patch_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize_first=False,
        facts={},
    )


class Readouts(torch.nn.Module):
    """The linear read-outs trained with the encoder and dropped after: the class, from any
    token, and a patch token's own pixels."""

    def __init__(self, config: EncoderTrainConfig) -> None:
        super().__init__()
        self.classes = torch.nn.Linear(config.hidden_size, len(CLASSES))
        self.pixels = torch.nn.Linear(config.hidden_size, 3 * config.patch_size**2)

    def forward(self, encoder: FeatureEncoder, pixels: torch.Tensor):
        """uint8 (b, 3, H, W) -> class logits from the class token (b, classes) and from each
        patch token (b, T, classes), and the squared error of each patch token's reading of its
        own (normalized) pixels (b, T)."""
        patch, cls = encoder(pixels)
        tokens = patch.transpose(1, 2)  # (b, T, D), row-major as the patches
        target = F.unfold(encoder.model_input(pixels).float(), encoder.patch, stride=encoder.patch)
        error = (self.pixels(tokens) - target.transpose(1, 2)).square().mean(2)
        return self.classes(cls[:, :, 0]), self.classes(tokens), error


def loss_of(readouts: Readouts, encoder, pixels, labels, config: EncoderTrainConfig):
    """Class token's cross-entropy + patch_weight x the patch tokens' + pixel_weight x MSE."""
    cls, patch, error = readouts(encoder, pixels)
    ce_patch = F.cross_entropy(patch.flatten(0, 1), labels.repeat_interleave(patch.shape[1]))
    return (
        F.cross_entropy(cls, labels)
        + config.patch_weight * ce_patch
        + (config.pixel_weight * error.mean())
    )


@torch.no_grad()
def held_out(readouts, encoder, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Held-out accuracy of the class token's reading, the share of patch tokens that name
    their image's class, and the patch tokens' pixel error (normalized units)."""
    right_cls = right_patch = tokens = 0
    error = 0.0
    for b in range(0, len(images), 256):
        cls, patch, err = readouts(encoder, images[b : b + 256])
        y = labels[b : b + 256]
        right_cls += int((cls.argmax(1) == y).sum())
        right_patch += int((patch.argmax(2) == y[:, None]).sum())
        tokens += patch.shape[0] * patch.shape[1]
        error += float(err.sum())
    return {
        "val_accuracy_cls": right_cls / len(labels),
        "val_accuracy_patch": right_patch / tokens,
        "val_pixel_mse": error / tokens,
    }


def train_encoder(config: EncoderTrainConfig) -> dict:
    """Train, measure the held-out accuracies, save the encoder (head dropped); the metrics."""
    torch.manual_seed(config.seed)
    data = generate_training_arrays(
        config.image_size, config.train_per_class, config.val_per_class, config.data_seed
    )
    x = torch.from_numpy(data["train"][0]).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, H, W)
    y = torch.from_numpy(data["train"][1])
    encoder = build_encoder(config)
    readouts = Readouts(config)
    params = [*encoder.parameters(), *readouts.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, config.steps))
    gen = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    encoder.train()
    for step in range(config.steps):
        idx = torch.randint(len(x), (config.batch_size,), generator=gen)
        flip = torch.rand(config.batch_size, generator=gen) < 0.5  # the store holds flips too
        pixels = torch.where(flip[:, None, None, None], x[idx].flip(3), x[idx])
        loss = loss_of(readouts, encoder, pixels, y[idx], config)
        optimizer_step(
            opt, sched, loss, step, config.steps, batch_size=config.batch_size, started=t0
        )
    encoder.eval()
    val = torch.from_numpy(data["val"][0]).permute(0, 3, 1, 2).contiguous()
    metrics = held_out(readouts, encoder, val, torch.from_numpy(data["val"][1]))
    metrics |= {
        "val_images": len(val),
        "parameters": sum(p.numel() for p in encoder.model.parameters()),
        "train_seconds": time.perf_counter() - t0,
    }
    encoder.model.save_pretrained(config.out)
    recipe = {k: v for k, v in asdict(config).items() if k != "out"}
    (config.out / TRAINING_FILE).write_text(
        json.dumps({"config": recipe, "metrics": metrics}, indent=2) + "\n"
    )
    log.info("saved %s: %s", config.out, metrics)
    return metrics
