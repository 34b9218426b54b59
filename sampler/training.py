"""The sample-grid hook the trainer calls during training (`latentdit train --vae ...`).

    train(cfg, sample_fn=sample_grid_hook("stabilityai/sd-vae-ft-ema"))

Every call writes RUN/samples/<step>.png: one image per class (the first GRID_CLASSES classes)
from the EMA model, with the same noise each time, so grids of successive steps compare directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sampler import outputs
from sampler.config import SolveConfig
from sampler.decoder import LatentDecoder
from sampler.latents import make_latents
from sampler.plan import ImageNoise
from trainer.checkpoint import step_name
from trainer.model import DiT
from trainer.objective import objective_from_meta

log = logging.getLogger(__name__)

GRID_CLASSES = 16
GRID_STEPS = 25
GRID_SEED = 0


def sample_grid_hook(vae_id: str, *, steps: int = GRID_STEPS, cfg: float = 1.0):
    """A `trainer.train.SampleFn` that decodes with only the decoder of `vae_id` (loaded once)."""
    decoders: dict[str, LatentDecoder] = {}

    def sample_fn(ema: DiT, meta: dict[str, Any], step: int, run_dir: Path) -> Path:
        device = next(ema.parameters()).device
        if "decoder" not in decoders:
            decoders["decoder"] = LatentDecoder.load(vae_id, meta, device=device)
        labels = torch.arange(min(GRID_CLASSES, len(meta["classes"])))
        z = make_latents(
            ema,
            objective_from_meta(meta["objective"]),
            labels,
            ImageNoise(GRID_SEED, range(len(labels))),
            SolveConfig(steps=steps, cfg=cfg),
            latent_shape=tuple(meta["latent_shape"]),
            device=device,
            precision="bf16" if device.type == "cuda" else "fp32",
        )
        images = decoders["decoder"](z).numpy()
        path = run_dir / "samples" / f"{step_name(step)}.png"
        outputs.write_png(path, outputs.make_grid(np.asarray(images)))
        log.info("wrote sample grid %s", path)
        return path

    return sample_fn
