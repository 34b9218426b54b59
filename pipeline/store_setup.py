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
    ArraySpec,
    LatentditError,
    QuantParams,
    SchemaMismatchError,
    StoreExistsError,
    StoreIncompleteError,
    StoreNotFoundError,
    StoreSpec,
    add_array,
    calibrate,
    open_store,
)
from latent_store.arrays import latent_arrays
from pipeline.encode_config import EncodeConfig
from pipeline.feature_graph import NAMES
from pipeline.feature_setup import (
    calibrate_features,
    check_same_features,
    planned_arrays,
    read_projection,
    refuse_rae_duplicate,
    write_projection,
)
from pipeline.features_config import FEATURES
from pipeline.loader import Batch, collate, load_item
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
    cfg: EncodeConfig,
    source: ImageSource,
    vae,
    vae_info,
    quant=None,
    logstd_quant=None,
    features: tuple[ArraySpec, ...] = (),
) -> StoreSpec:
    """The spec this configuration asks for; placeholder quantization when none is given yet.
    `features`: the declarations of the feature arrays made with the store (`feature_setup`).

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
        arrays=(*arrays, *features),
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


def prepare_store(
    cfg: EncodeConfig, source, vae, vae_info, pre: PreprocessConfig, encoder=None
) -> None:
    """Create the store (calibrating its quantization), or check an existing one matches.

    With a features `encoder` (`pipeline.features`): a new store declares the feature arrays
    with the latents; a complete store made without them gets them declared as arrays added
    later (`latent_store.added`), its latents untouched; a store that has them must have been
    made by the same encoder with the same options.
    """
    fcfg = cfg.features_config(str(vae.device))
    if encoder is not None:
        refuse_rae_duplicate(vae, encoder, fcfg)
    wanted = store_spec(cfg, source, vae, vae_info)  # the latents; the features apart
    out, options = cfg.out, cfg.store_options
    clear_half_made(out, options)  # an interrupted creation is redone, never refused forever
    if _store_exists(out, options):
        try:
            store = open_store(out, storage_options=options)
        except StoreNotFoundError:
            raise StoreExistsError(
                f"--out {out}: a folder that holds something other than a latent store; choose "
                "a new or empty folder"
            ) from None
        _check_resume(store, wanted, encoder, fcfg)
        if encoder is not None and not set(NAMES) <= set(store.spec.names):
            _add_features(cfg, source, pre, store, encoder, fcfg)
        log.info("resuming %s", out)
        return
    batch = calibration_batch(cfg, source, pre)
    quant, logstd_quant = calibrate_quantization(cfg, source, vae, pre, batch)
    made = None
    if encoder is not None:
        made = calibrate_features(
            encoder, fcfg, batch.crops, flip=cfg.flip, batch_size=cfg.batch_size
        )
    features = made.arrays if made else ()
    spec = store_spec(cfg, source, vae, vae_info, quant, logstd_quant, features)
    keys = [source.key(i) for i in range(len(source))]
    then = (lambda store: write_projection(store, made)) if made is not None else None
    create_store_marked(out, spec, keys, options, then=then)


def _check_resume(store, wanted: StoreSpec, encoder, fcfg) -> None:
    """Refuse (one line, nothing written) a store made with another configuration."""
    have, out = store.spec, store.path
    if FEATURES in have.base_names and encoder is None:
        made_by = have.array(FEATURES).made_by or {}
        raise SchemaMismatchError(
            f"{out} holds features made with the latents (by {made_by.get('encoder')}): re-run "
            "with the --features options that made it to resume it, or choose another --out"
        )
    if encoder is not None and FEATURES in have.names:
        check_same_features(out, have.array(FEATURES), encoder, fcfg)
    if encoder is not None and FEATURES in have.base_names:  # compare them as made with it
        wanted = replace(wanted, arrays=(*wanted.arrays, *planned_arrays(encoder, fcfg)))
    if diffs := have.differences(wanted, RESUME_FIELDS):
        raise SchemaMismatchError(
            f"{out} holds a store made with another configuration: {'; '.join(diffs)}. "
            "Re-run with the original options to resume it, or choose another --out"
        )


def _add_features(cfg: EncodeConfig, source, pre, store, encoder, fcfg) -> None:
    """Declare the feature arrays on a complete store (calibrated as a new store's would be)."""
    if missing := store.missing_shards():
        raise StoreIncompleteError(
            f"--features: {store.path} is not complete ({len(missing)} of "
            f"{store.spec.num_shards} shards); finish it first with the command that made it "
            "(without --features), then run this one to add the features"
        )
    batch = calibration_batch(cfg, source, pre)
    declared = FEATURES in store.spec.names  # by a run stopped before it declared features_cls
    made = calibrate_features(
        encoder,
        fcfg,
        batch.crops,
        flip=cfg.flip,
        batch_size=cfg.batch_size,
        projection=read_projection(store) if declared else None,
    )
    if not declared:
        write_projection(store, made)  # before the declaration: an undeclared array until then
    for array in (a for a in made.arrays if a.name not in store.spec.names):
        store = add_array(store, array)
    log.info("%s: features declared; the latents are kept as they are", store.path)


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


def calibration_batch(cfg: EncodeConfig, source, pre) -> Batch:
    """The calibration images (`calibration_indices`), decoded and cropped; one line when none
    of them can be decoded."""
    items = [
        load_item(source, i, pre) for i in calibration_indices(len(source), cfg.calibration_samples)
    ]
    batch = collate(items)
    if not batch.ok:
        reasons = "; ".join(f"{source.key(i)}: {r}" for i, r in batch.failures[:3])
        raise LatentditError(f"none of the calibration images could be decoded ({reasons})")
    return batch


def calibrate_quantization(
    cfg: EncodeConfig, source, vae, pre, batch: Batch | None = None
) -> tuple[QuantParams, QuantParams | None]:
    """Quantization ranges from the latents of the calibration images (all variants).

    Depends only on the source and the configuration, never on ranks or on a resume.
    `batch`: the calibration images if already decoded (`calibration_batch`).
    """
    batch = calibration_batch(cfg, source, pre) if batch is None else batch
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
