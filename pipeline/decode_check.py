"""Decode stored latents and compare them with the re-cropped source images (PSNR).

    latentdit validate train.zarr --decode-check 64

Two figures per store: the PSNR of images decoded from the stored uint8 latents, and the PSNR of
images decoded from the float latents of the same crops encoded now. Their difference is what
the uint8 quantization costs; the second figure alone is the VAE's own reconstruction quality.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from foundation.vae import VaeConfig, decode_latents
from latent_store import LABEL_FILL, LatentStore, SchemaMismatchError, dequantize, open_store
from pipeline.loader import collate, load_item
from pipeline.preprocess import PreprocessConfig
from pipeline.source import reopen_source
from pipeline.vae import encode_variants, load_vae

log = logging.getLogger(__name__)

PIXEL_MAX = 255.0


@dataclass(frozen=True, kw_only=True)
class DecodeCheckConfig:
    """How many stored latents to decode, and with which VAE."""

    samples: int = 16
    """Written samples to decode, spread evenly over the store."""
    vae: str | None = None
    """VAE hub id or folder; None: the one recorded in the store."""
    vae_revision: str | None = None
    """Hub revision; None: the one recorded in the store."""
    dtype: str = "fp32"
    """VAE compute dtype."""
    device: str = "cpu"
    """Torch device for the VAE."""
    batch_size: int = 16
    """Images per VAE call."""

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError("samples and batch_size must be at least 1")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 images (B, H, W, 3)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(PIXEL_MAX**2 / mse.clamp_min(1e-12))


def decode_check(path: str | os.PathLike | LatentStore, cfg: DecodeCheckConfig) -> dict:
    """Decode `cfg.samples` stored latents (image variant); PSNR against the source crops.

    `path`: a store folder, URL or open store (see `latent_store.open_store`).
    """
    store = open_store(path)
    spec = store.spec
    vae, info = load_vae(
        VaeConfig(
            id=cfg.vae or spec.vae.id,
            revision=cfg.vae_revision or spec.vae.revision,
            dtype=cfg.dtype,
            device=cfg.device,
            channels_last=False,
        )
    )
    if (info.latent_channels, info.downsampling) != (
        spec.vae.latent_channels,
        spec.vae.downsampling,
    ):
        raise SchemaMismatchError(
            f"--vae {info.id} makes {info.latent_channels}-channel latents at 1/{info.downsampling}, "
            f"the store holds {spec.vae.latent_channels} at 1/{spec.vae.downsampling} "
            f"(encoded with {spec.vae.id})"
        )
    source = reopen_source(spec.source)
    if source.describe()["fingerprint"] != spec.source["fingerprint"]:
        raise SchemaMismatchError(
            f"the source {spec.source['path']} changed since the store was encoded; "
            "decode-check needs the original images"
        )
    labels = store.array("labels")[:]
    written = np.flatnonzero(labels != LABEL_FILL)
    chosen = written[
        np.linspace(0, len(written) - 1, min(cfg.samples, len(written))).round().astype(int)
    ]
    chosen = np.unique(chosen)
    pre = PreprocessConfig(image_size=spec.image_size, exif_transpose="exif" in spec.crop)
    stored_psnr, float_psnr, errors = [], [], []
    latents = store.array("latents")
    for b in range(0, len(chosen), cfg.batch_size):
        idx = chosen[b : b + cfg.batch_size]
        batch = collate([load_item(source, int(i), pre) for i in idx])
        if batch.failures:
            raise SchemaMismatchError(
                f"source image {source.key(batch.failures[0][0])} no longer decodes: {batch.failures[0][1]}"
            )
        stored = dequantize(latents.get_orthogonal_selection(idx)[:, 0], spec.quant)
        keys = [source.key(int(i)) for i in idx]
        posterior = "mean" if spec.posterior == "moments" else spec.posterior
        fresh = encode_variants(vae, batch.crops, keys, flip=False, posterior=posterior)[0][:, 0]
        stored_psnr.append(psnr(decode_latents(vae, stored), batch.crops))
        float_psnr.append(psnr(decode_latents(vae, fresh.cpu()), batch.crops))
        errors.append((stored - fresh.cpu()).pow(2).flatten(1).mean(1))
    stored_db, float_db = torch.cat(stored_psnr).mean().item(), torch.cat(float_psnr).mean().item()
    result = {
        "samples": len(chosen),
        "vae": info.id,
        "psnr_stored_db": stored_db,
        "psnr_float_db": float_db,
        "quantization_cost_db": float_db - stored_db,
        "latent_rmse": math.sqrt(torch.cat(errors).mean().item()),
    }
    log.info("decode check: %s", result)
    return result
