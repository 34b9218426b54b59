"""Create the store of an encode job, or check that an existing one matches it (resume).

The quantization is calibrated once, before the store exists, from images spread evenly over the
source: the same result for any number of ranks and on every resume (a resume reuses the store's).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from foundation.urls import is_url
from latent_store import (
    LatentditError,
    QuantParams,
    SchemaMismatchError,
    StoreExistsError,
    StoreNotFoundError,
    StoreSpec,
    calibrate,
    open_store,
)
from latent_store.arrays import latent_arrays
from pipeline.encode_config import EncodeConfig
from pipeline.loader import collate, load_item
from pipeline.preprocess import PreprocessConfig
from pipeline.source import ImageSource
from pipeline.store_create import clear_half_made, create_store_marked
from pipeline.vae import encodable_shape, encode_variants

log = logging.getLogger(__name__)

CROP_METHOD = "adm-center"
EXIF_TAG = "+exif-transpose"  # appended to the crop method when EXIF orientation is applied
# fields of the store's spec that must match for a resume (the quantization is the store's own)
RESUME_FIELDS = (
    "vae",
    "image_size",
    "crop",
    "source",
    "variants",
    "posterior",
    "num_samples",
    "arrays",
    "classes",
    "chunk_size",
    "shard_size",
)


def store_spec(
    cfg: EncodeConfig, source: ImageSource, vae, vae_info, quant=None, logstd_quant=None
) -> StoreSpec:
    """The spec this configuration asks for; placeholder quantization when none is given yet.

    Refuses, in one line, an image size the autoencoder `vae` cannot take and a posterior mode it
    has nothing for (before anything is written)."""
    shape = encodable_shape(vae, image_size=cfg.image_size, posterior=cfg.posterior)
    placeholder = QuantParams(offset=(0.0,) * shape[0], scale=(1.0,) * shape[0])
    moments = cfg.posterior == "moments"
    arrays = latent_arrays(
        shape,
        quant or placeholder,
        (logstd_quant or placeholder) if moments else None,
    )
    return StoreSpec(
        num_samples=len(source),
        arrays=arrays,
        vae=vae_info,
        classes=source.classes,
        variants=cfg.variants,
        posterior=cfg.posterior,
        image_size=cfg.image_size,
        crop=CROP_METHOD + (EXIF_TAG if cfg.exif_transpose else ""),
        source=source.describe(),
        chunk_size=cfg.chunk_size,
        shard_size=cfg.shard_size,
        tool_version=_tool_version(),
        command=cfg.command,
    )


def _tool_version() -> str:
    try:
        return f"latentdit {version('latentdit')}"
    except PackageNotFoundError:
        return "latentdit (not installed)"


def prepare_store(cfg: EncodeConfig, source, vae, vae_info, pre: PreprocessConfig) -> None:
    """Create the store (calibrating its quantization), or check an existing one matches."""
    wanted = store_spec(cfg, source, vae, vae_info)
    out, options = cfg.out, cfg.store_options
    clear_half_made(out, options)  # an interrupted creation is redone, never refused forever
    if _store_exists(out, options):
        try:
            have = open_store(out, storage_options=options).spec
        except StoreNotFoundError:
            raise StoreExistsError(
                f"--out {out}: a folder that holds something other than a latent store; choose "
                "a new or empty folder"
            ) from None
        if diffs := have.differences(wanted, RESUME_FIELDS):
            raise SchemaMismatchError(
                f"{out} holds a store made with another configuration: {'; '.join(diffs)}. "
                "Re-run with the original options to resume it, or choose another --out"
            )
        log.info("resuming %s", out)
        return
    quant, logstd_quant = calibrate_quantization(cfg, source, vae, pre)
    spec = store_spec(cfg, source, vae, vae_info, quant, logstd_quant)
    keys = [source.key(i) for i in range(len(source))]
    create_store_marked(out, spec, keys, options)


def _store_exists(out: str | Path, storage_options: dict | None) -> bool:
    """Whether `out` holds something: a non-empty folder, or a store at an fsspec URL."""
    if not is_url(out):
        if Path(out).exists() and not Path(out).is_dir():
            raise StoreExistsError(f"--out {out}: a file, not a store folder; choose another --out")
        return Path(out).exists() and any(Path(out).iterdir())
    try:
        open_store(out, storage_options=storage_options)
    except StoreNotFoundError:
        return False
    return True


def calibration_indices(num_samples: int, count: int) -> list[int]:
    """`count` indices spread evenly over the source (sorted ImageNet lists are grouped by class)."""
    return sorted(set(np.linspace(0, num_samples - 1, min(count, num_samples)).round().astype(int)))


def calibrate_quantization(
    cfg: EncodeConfig, source, vae, pre
) -> tuple[QuantParams, QuantParams | None]:
    """Quantization ranges from the latents of the calibration images (all variants).

    Depends only on the source and the configuration, never on ranks or on a resume.
    """
    items = [
        load_item(source, i, pre) for i in calibration_indices(len(source), cfg.calibration_samples)
    ]
    batch = collate(items)
    if not batch.ok:
        reasons = "; ".join(f"{source.key(i)}: {r}" for i, r in batch.failures[:3])
        raise LatentditError(f"none of the calibration images could be decoded ({reasons})")
    means, logstds = [], []
    for b in range(0, len(batch.ok), cfg.batch_size):
        part = replace(
            batch, ok=batch.ok[b : b + cfg.batch_size], crops=batch.crops[b : b + cfg.batch_size]
        )
        keys = [source.key(i) for i in part.ok]
        mean, logstd = encode_variants(
            vae, part.crops, keys, flip=cfg.flip, posterior=cfg.posterior
        )
        means.append(mean.cpu())
        if logstd is not None:
            logstds.append(logstd.cpu())
    quant = calibrate(torch.cat(means))
    log.info("calibrated quantization on %d images: %s", len(batch.ok), quant.to_attrs())
    return quant, calibrate(torch.cat(logstds)) if logstds else None
