"""FID during training: the trainer's `eval_fn` hook (`latentdit train --eval-every N`).

    train(cfg, eval_fn=fid_hook(vae_id, "val_stats.npz", samples=5000))

Every call samples `samples` class-balanced images from the EMA model (image i is of class
i mod num_classes, with its own fixed noise, so successive evaluations differ only by the
weights), decodes them through the sampler's decoder-only path (the seam of the sample grids),
and scores them against the reference (statistics loaded once) with ADM's formulas.

Under torchrun the trainer calls it on every rank: each rank samples and featurizes its share of
the images (a contiguous run of whole batches, `ImageSet.share`: each class within one image of
its share), rank 0 gathers the features and scores them, and every rank returns its metrics, so
all ranks go back to training together. Image i's class and noise depend only on i: the features
are those of one process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.evaluate import EvaluateConfig, check_networks, open_inputs, summarize
from evaluation.features import featurize
from evaluation.inputs import ImageSet, StatsFile, cuts
from evaluation.network import load_inception
from evaluation.scoring import compare, set_stats
from evaluation.spaces import DEFAULT_METRICS, INCEPTION
from foundation.distributed import on_main, rank_and_world
from sampler.decoder import LatentDecoder
from sampler.latents import SolveConfig, make_latents
from sampler.plan import ImageNoise
from trainer.model import DiT
from trainer.objective import objective_from_meta

log = logging.getLogger(__name__)

EVAL_SEED = 0
EVAL_STEPS = 25  # solver steps (Heun for flow matching: 2 model calls each)
EVAL_BATCH = 50


def ema_images(ema: DiT, meta: dict[str, Any], decoder: LatentDecoder, *, start: int, stop: int,
               steps: int, cfg: float, batch_size: int) -> Iterator[np.ndarray]:  # fmt: skip
    """uint8 (b, H, W, 3) batches of class-balanced EMA samples [start, stop) with fixed noise."""
    device = next(ema.parameters()).device
    classes = len(meta["classes"])
    for a, b in cuts(start, stop, batch_size):
        index = range(a, b)
        z = make_latents(
            ema,
            objective_from_meta(meta["objective"]),
            torch.tensor([i % classes for i in index]),
            ImageNoise(EVAL_SEED, index),
            SolveConfig(steps=steps, cfg=cfg),
            latent_shape=tuple(meta["latent_shape"]),
            device=device,
            precision="bf16" if device.type == "cuda" else "fp32",
        )
        yield decoder(z).numpy()


def fid_hook(vae_id: str, ref: str | Path, *, samples: int = 5000, steps: int = EVAL_STEPS,
             cfg: float = 1.0, inception: Path | None = None, batch_size: int = EVAL_BATCH):  # fmt: skip
    """A `trainer.train.EvalFn`: FID, sFID, IS, precision and recall of EMA samples against `ref`.

    Call it on every rank of the group (each makes its share); every rank gets the metrics.
    """
    loaded: dict[str, Any] = {}

    def eval_fn(ema: DiT, meta: dict[str, Any], step: int, run_dir: Path) -> dict[str, Any]:
        device = next(ema.parameters()).device
        t0 = time.perf_counter()
        if not loaded:
            ref_cfg = EvaluateConfig(samples=Path(ref), workers=0, metrics=DEFAULT_METRICS)
            (opened,) = open_inputs(ref_cfg, str(device))
            loaded["nets"] = {INCEPTION: load_inception(inception, device=device)}
            if isinstance(opened, StatsFile):
                check_networks(opened, ref_cfg.metric_names, loaded["nets"])
            loaded["decoder"] = LatentDecoder.load(vae_id, meta, device=device)
            loaded["ref"] = summarize(opened, ref_cfg, loaded["nets"], str(device))
        images = ImageSet(
            "ema samples", run_dir, samples,
            lambda b, start, stop: ema_images(ema, meta, loaded["decoder"], start=start,
                                              stop=stop, steps=steps, cfg=cfg, batch_size=b),
        )  # fmt: skip
        nets = loaded["nets"]
        f = featurize(images, list(nets.values()), batch_size=batch_size, device=device)

        def score() -> dict[str, Any]:  # rank 0, which holds every rank's features
            mine = set_stats("ema samples", run_dir, f, nets)
            metrics = tuple(DEFAULT_METRICS.split(","))
            values, _, _ = compare(mine, loaded["ref"], nets, metrics, str(device))
            values.pop("fd_dinov2")
            values.update(eval_samples=samples, eval_ranks=rank_and_world()[1],
                          eval_seconds=time.perf_counter() - t0)  # fmt: skip
            log.info("step %d: FID %.3f of %d EMA samples", step, values["fid"], samples)
            return values

        return on_main(score)

    return eval_fn
