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

from foundation.autoencoders.loading import VaeConfig
from latent_store import LatentditError, LatentStore, SchemaMismatchError, dequantize, open_store
from latent_store.config import DEFAULT_MIN_PSNR
from latent_store.verify import verify_shard, verify_store
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
    min_psnr: float = DEFAULT_MIN_PSNR
    """The check fails when the mean PSNR from stored latents is below this (dB)."""
    verify: bool = True
    """Verify the store's seal and each shard read against its record first."""

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1:
            raise LatentditError(
                f"--decode-check {self.samples}: decode at least 1 sample (batch {self.batch_size})"
            )


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 images (B, H, W, 3)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(PIXEL_MAX**2 / mse.clamp_min(1e-12))


def _choose(store: LatentStore, samples: int) -> np.ndarray:
    """Up to `samples` written sample indices, spread evenly over the complete shards."""
    records = store.records()
    written = []
    for shard in store.require_complete():
        r = records[shard]
        written += sorted(set(range(r.start, r.stop)) - {f.index for f in r.failures})
    picks = np.linspace(0, len(written) - 1, min(samples, len(written))).round().astype(int)
    return np.unique(np.asarray(written)[picks])


def _read_codes(store: LatentStore, indices: np.ndarray, verify: bool) -> np.ndarray:
    """uint8 latents of `indices`, from whole shards that passed verification (with `verify`)."""
    if not verify:
        return store.array("latents").get_orthogonal_selection(indices)
    verify_store(store)
    records, size = store.records(), store.spec.shard_size
    rows = []
    for shard in np.unique(indices // size):
        data = verify_shard(store, int(shard), records[shard])
        rows.append(data["latents"][indices[indices // size == shard] - shard * size])
    return np.concatenate(rows)


def check_fits_store(ae, spec, posterior: str) -> None:
    """Refuse an autoencoder that does not make the store's latents, naming both."""
    why = ae.misfit(family=spec.vae.cls, image_size=spec.image_size, latent_shape=spec.latent_shape)
    if why:
        raise SchemaMismatchError(
            f"--vae {ae.name} does not make this store's latents ({why}; encoded with "
            f"{spec.vae.id}): pass the store's autoencoder as --vae"
        )
    ae.check_posterior(posterior)


def decode_check(path: str | os.PathLike | LatentStore, cfg: DecodeCheckConfig) -> dict:
    """Decode `cfg.samples` stored latents (image variant); PSNR against the source crops.

    `path`: a store folder, URL or open store (see `latent_store.open_store`). The result's "ok"
    is False when the mean PSNR from stored latents is below `cfg.min_psnr`.
    """
    store = open_store(path)
    spec = store.spec
    chosen = _choose(store, cfg.samples)
    codes = _read_codes(store, chosen, cfg.verify)  # refuses a damaged store before the VAE loads
    ae, info = load_vae(
        VaeConfig(
            id=cfg.vae or spec.vae.id,
            revision=cfg.vae_revision or spec.vae.revision,
            dtype=cfg.dtype,
            device=cfg.device,
            channels_last=False,
        )
    )
    posterior = "mean" if spec.posterior == "moments" else spec.posterior
    check_fits_store(ae, spec, posterior)
    source = reopen_source(spec.source)
    if source.describe()["fingerprint"] != spec.source["fingerprint"]:
        raise SchemaMismatchError(
            f"the source {spec.source['path']} changed since the store was encoded; "
            "decode-check needs the original images"
        )
    pre = PreprocessConfig(image_size=spec.image_size, exif_transpose="exif" in spec.crop)
    stored_psnr, float_psnr, errors = [], [], []
    for b in range(0, len(chosen), cfg.batch_size):
        idx = chosen[b : b + cfg.batch_size]
        batch = collate([load_item(source, int(i), pre) for i in idx])
        if batch.failures:
            raise SchemaMismatchError(
                f"source image {source.key(batch.failures[0][0])} no longer decodes: {batch.failures[0][1]}"
            )
        stored = dequantize(codes[b : b + cfg.batch_size, 0], spec.quant)
        keys = [source.key(int(i)) for i in idx]
        fresh = encode_variants(ae, batch.crops, keys, flip=False, posterior=posterior)[0][:, 0]
        stored_psnr.append(psnr(ae.decode_to_uint8(stored), batch.crops))
        float_psnr.append(psnr(ae.decode_to_uint8(fresh.cpu()), batch.crops))
        errors.append((stored - fresh.cpu()).pow(2).flatten(1).mean(1))
    stored_db, float_db = torch.cat(stored_psnr).mean().item(), torch.cat(float_psnr).mean().item()
    result = {
        "samples": len(chosen),
        "vae": info.id,
        "psnr_stored_db": stored_db,
        "psnr_float_db": float_db,
        "quantization_cost_db": float_db - stored_db,
        "latent_rmse": math.sqrt(torch.cat(errors).mean().item()),
        "min_psnr_db": cfg.min_psnr,
        "ok": stored_db >= cfg.min_psnr,
    }
    log.info("decode check: %s", result)
    return result
