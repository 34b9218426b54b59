"""The encode job: an image source through a VAE encoder into a latent store, resumable.

    latentdit encode imagenet/train --out train.zarr --vae stabilityai/sd-vae-ft-ema
    torchrun --nproc_per_node=8 -m cli encode imagenet/train --out train.zarr ...

Rank 0 lists the source, calibrates the quantization and creates the store (or checks that an
existing one was made with the same configuration); every rank then encodes the shards it owns
(shard i belongs to rank i % world_size) and writes nothing else; rank 0 finalizes. Re-running
the same command skips complete shards and yields a bit-identical store.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from latent_store import (
    LABEL_FILL,
    VARIANTS,
    Failure,
    LatentditError,
    LatentStore,
    QuantParams,
    SchemaMismatchError,
    StoreNotFoundError,
    StoreSpec,
    StoreWriter,
    calibrate,
    create_store,
    finalize_store,
    quantize,
)
from latent_store.schema import DEFAULT_CHUNK_SIZE, DEFAULT_SHARD_SIZE, POSTERIOR_MODES
from pipeline import distributed
from pipeline.loader import Batch, collate, crop_loader, load_item, shard_batches
from pipeline.preprocess import DEFAULT_MAX_PIXELS, PreprocessConfig
from pipeline.source import LABEL_KEY, ImageSource, open_source
from pipeline.vae import DTYPES, VaeConfig, encode_posterior, key_seed, load_vae

log = logging.getLogger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
CROP_METHOD = "adm-center"
URL_SCHEME = "://"  # marks an fsspec URL, as opposed to a local path
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
    "latent_shape",
    "classes",
    "chunk_size",
    "shard_size",
)


class TooManyFailuresError(LatentditError):
    """More source images failed to decode than --max-failures allows."""


@dataclass(frozen=True, kw_only=True)
class EncodeConfig:
    """One encode job: where the images are, how to encode them, where the store goes."""

    source: Path
    """An ImageNet-style class-folder tree, a flat val folder (with `val_labels`), or webdataset
    tars: a folder of them, a brace pattern, or a .txt file listing tar paths."""
    out: str | Path
    """The store to create, or to resume when it exists: a folder or an fsspec URL (s3://...)."""
    vae: str = DEFAULT_VAE
    """Hub id or local folder of a diffusers AutoencoderKL."""
    vae_revision: str | None = None
    """Hub revision of the VAE."""
    dtype: str = "fp32"
    """VAE compute dtype: fp32, fp16 or bf16."""
    device: str | None = None
    """cpu or cuda; None picks CUDA when available."""
    compile: bool = False
    """torch.compile the VAE encoder."""
    image_size: int = 256
    """Side of the ADM center crop in pixels."""
    flip: bool = False
    """Also encode the horizontal flip of every crop (a second variant)."""
    posterior: str = "mean"
    """mean, sample (seeded per key), or moments (mean and log std)."""
    batch_size: int = 64
    """Images per VAE forward pass."""
    workers: int = 4
    """DataLoader worker processes that decode and crop (0: in the main process)."""
    val_labels: Path | None = None
    """ImageNet val labels: LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt."""
    classes: Path | None = None
    """Class list file (one id per line) fixing the label order; default: sorted folder names."""
    devkit_synsets: Path | None = None
    """wnids in the devkit's meta.mat order, for the devkit ground truth (else meta.mat + scipy)."""
    label_key: str = LABEL_KEY
    """Webdataset tars: the json field holding each sample's class (a .cls member wins)."""
    include_unfinished: bool = False
    """Webdataset tars: also use tars that have no img2dataset `_stats.json` (unfinished)."""
    max_failures: int | float = 0.01
    """Undecodable images tolerated: a count (int) or a fraction of the source (float < 1)."""
    exif_transpose: bool = False
    """Apply EXIF orientation before cropping (off: ImageNet parity)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels are skipped as decompression bombs."""
    shard_size: int = DEFAULT_SHARD_SIZE
    """Samples per store shard (the unit of work and of resume)."""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    """Samples per Zarr chunk; divides shard_size."""
    calibration_samples: int = 512
    """Images, spread evenly over the source, that set the quantization range."""
    command: str = ""
    """The command line, recorded in the store."""

    def __post_init__(self) -> None:
        positive = ("image_size", "batch_size", "shard_size", "chunk_size", "calibration_samples")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.shard_size % self.chunk_size:
            raise LatentditError(
                f"--shard-size {self.shard_size} must be a multiple of --chunk-size {self.chunk_size}"
            )
        if self.posterior not in POSTERIOR_MODES:
            raise LatentditError(f"--posterior {self.posterior!r}: use one of {POSTERIOR_MODES}")
        if self.dtype not in DTYPES:
            raise LatentditError(f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.max_failures < 0 or (
            isinstance(self.max_failures, float) and self.max_failures >= 1
        ):
            raise LatentditError(
                f"--max-failures {self.max_failures}: a count >= 0 or a fraction in [0, 1)"
            )

    @property
    def variants(self) -> tuple[str, ...]:
        return VARIANTS if self.flip else VARIANTS[:1]

    def failure_limit(self, num_samples: int) -> int:
        """The most failures allowed for a source of `num_samples` images."""
        if isinstance(self.max_failures, float):
            return math.floor(self.max_failures * num_samples)
        return self.max_failures


def parse_max_failures(text: str) -> int | float:
    """'100' -> 100 images; '0.01' or '1%' -> a fraction of the source."""
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100
        return float(text) if "." in text or "e" in text.lower() else int(text)
    except ValueError:
        raise LatentditError(
            f"--max-failures {text!r}: give a count (100), a fraction (0.01) or a percentage (1%)"
        ) from None


def encode(cfg: EncodeConfig) -> dict | None:
    """Run the encode job on this rank; returns the store summary on rank 0, None elsewhere."""
    info = distributed.init_distributed(cfg.device)
    try:
        return _encode(cfg, info)
    finally:
        distributed.shutdown(info)


def _encode(cfg: EncodeConfig, info: distributed.DistInfo) -> dict | None:
    source = open_source(
        cfg.source,
        val_labels=cfg.val_labels,
        classes=cfg.classes,
        devkit_synsets=cfg.devkit_synsets,
        label_key=cfg.label_key,
        include_unfinished=cfg.include_unfinished,
    )
    vae, vae_info = load_vae(
        VaeConfig(
            id=cfg.vae,
            revision=cfg.vae_revision,
            dtype=cfg.dtype,
            device=str(info.device),
            compile=cfg.compile,
        )
    )
    pre = PreprocessConfig(
        image_size=cfg.image_size, exif_transpose=cfg.exif_transpose, max_pixels=cfg.max_pixels
    )
    error = None
    if info.is_main:
        try:
            prepare_store(cfg, source, vae, vae_info, pre)
        except LatentditError as e:
            error = e
    distributed.broadcast_error(info, error)
    store = LatentStore(cfg.out)
    owned = range(info.rank, store.spec.num_shards, info.world_size)
    writer = StoreWriter(store, owned)
    log.info(
        "rank %d/%d: %d of its %d shards to encode",
        info.rank,
        info.world_size,
        len(writer.todo),
        len(owned),
    )
    encode_shards(cfg, source, vae, pre, writer, info)
    distributed.barrier(info)
    if not info.is_main:
        return None
    summary = finalize_store(store)
    log.info(
        "%s: %d samples written, %d failed (%s)",
        cfg.out,
        summary["samples_written"],
        summary["samples_failed"],
        summary["failure_reasons"] or "no failures",
    )
    return summary


def store_spec(cfg: EncodeConfig, source: ImageSource, vae_info, quant=None, logstd_quant=None):
    """The spec this configuration asks for; placeholder quantization when none is given yet."""
    if cfg.image_size % vae_info.downsampling:
        raise LatentditError(
            f"--image-size {cfg.image_size} is not a multiple of the VAE's downsampling "
            f"{vae_info.downsampling}"
        )
    side = cfg.image_size // vae_info.downsampling
    channels = vae_info.latent_channels
    placeholder = QuantParams(offset=(0.0,) * channels, scale=(1.0,) * channels)
    moments = cfg.posterior == "moments"
    return StoreSpec(
        num_samples=len(source),
        latent_shape=(channels, side, side),
        quant=quant or placeholder,
        logstd_quant=(logstd_quant or placeholder) if moments else None,
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
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"latentdit {version('latentdit')}"
    except PackageNotFoundError:
        return "latentdit (not installed)"


def prepare_store(cfg: EncodeConfig, source, vae, vae_info, pre: PreprocessConfig) -> None:
    """Create the store (calibrating its quantization), or check an existing one matches."""
    wanted = store_spec(cfg, source, vae_info)
    out = cfg.out
    if _store_exists(out):
        have = LatentStore(out).spec
        if diffs := have.differences(wanted, RESUME_FIELDS):
            raise SchemaMismatchError(
                f"{out} holds a store made with another configuration: {'; '.join(diffs)}. "
                "Re-run with the original options to resume it, or choose another --out"
            )
        log.info("resuming %s", out)
        return
    quant, logstd_quant = calibrate_quantization(cfg, source, vae, pre)
    spec = store_spec(cfg, source, vae_info, quant, logstd_quant)
    create_store(out, spec, [source.key(i) for i in range(len(source))])


def _store_exists(out: str | Path) -> bool:
    """Whether `out` holds something: a non-empty folder, or a store at an fsspec URL."""
    if URL_SCHEME not in str(out):
        return Path(out).exists() and any(Path(out).iterdir())
    try:
        LatentStore(out)
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
        mean, logstd = _encode_batch(cfg, source, vae, part)
        means.append(mean.cpu())
        if logstd is not None:
            logstds.append(logstd.cpu())
    quant = calibrate(torch.cat(means))
    log.info("calibrated quantization on %d images: %s", len(batch.ok), quant.to_attrs())
    return quant, calibrate(torch.cat(logstds)) if logstds else None


def _encode_batch(
    cfg: EncodeConfig, source, vae, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode a batch's crops (and their flips): float (b, V, C, h, w) latents and log std or None."""
    crops = batch.crops.to(vae.device, non_blocking=True)
    views = [crops, crops.flip(2)] if cfg.flip else [crops]  # (b, H, W, 3): flip W
    seeds = None
    if cfg.posterior == "sample":
        seeds = [key_seed(source.key(i), v) for v in range(len(views)) for i in batch.ok]
    mean, logstd = encode_posterior(vae, torch.cat(views), posterior=cfg.posterior, seeds=seeds)
    b = len(batch.ok)

    def by_variant(x):  # (V*b, C, h, w) -> (b, V, C, h, w)
        return torch.stack(x.split(b), dim=1)

    return by_variant(mean), None if logstd is None else by_variant(logstd)


class ShardBuffer:
    """The latents, labels, failures and modes of one shard while it is being encoded."""

    def __init__(self, spec: StoreSpec, shard: int) -> None:
        self.shard = shard
        self.start, self.stop = spec.shard_bounds(shard)
        shape = (self.stop - self.start, *spec.sample_shape)
        self.latents = np.zeros(shape, np.uint8)
        self.logstd = np.zeros(shape, np.uint8) if spec.posterior == "moments" else None
        self.labels = np.full(self.stop - self.start, LABEL_FILL, np.int16)
        self.failures: list[Failure] = []
        self.modes: Counter[str] = Counter()
        self.clipped = 0
        self.seen = 0

    @property
    def full(self) -> bool:
        return self.seen == self.stop - self.start

    def write(self, writer: StoreWriter):
        return writer.write_shard(
            self.shard,
            self.latents,
            self.labels,
            logstd=self.logstd,
            failures=self.failures,
            image_modes=self.modes,
            clipped=self.clipped,
        )


def encode_shards(cfg: EncodeConfig, source, vae, pre, writer: StoreWriter, info) -> None:
    """Encode and write the shards in `writer.todo`; the next shard's compute overlaps a write."""
    spec = writer.spec
    limit = cfg.failure_limit(spec.num_samples)
    failed = sum(
        len(r.failures) for i, r in enumerate(writer.store.records()) if r and i in writer.done
    )
    bounds = [spec.shard_bounds(s) for s in writer.todo]
    loader = crop_loader(
        source,
        pre,
        shard_batches(bounds, cfg.batch_size),
        workers=cfg.workers,
        pin_memory=info.device.type == "cuda",
    )
    total = sum(b - a for a, b in bounds)
    bar = tqdm(total=total, unit="img", disable=not info.is_main, desc="encode", smoothing=0.05)
    buffers = {s: ShardBuffer(spec, s) for s in writer.todo}
    pending: Future | None = None
    started = time.perf_counter()
    with ThreadPoolExecutor(1, thread_name_prefix="shard-writer") as pool:
        for batch in loader:
            buf = buffers[batch.indices[0] // spec.shard_size]
            failed += _fill(cfg, source, vae, spec, buf, batch)
            if failed > limit:
                raise TooManyFailuresError(_too_many(cfg, source, failed, limit, buf))
            bar.update(len(batch.indices))
            bar.set_postfix(failed=failed, refresh=False)
            if buf.full:
                if pending is not None:
                    pending.result()  # at most one shard write in flight
                pending = pool.submit(buffers.pop(buf.shard).write, writer)
        if pending is not None:
            pending.result()
    bar.close()
    seconds = time.perf_counter() - started
    log.info(
        "rank %d: encoded %d images in %.1f s (%.1f images/s), %d failed",
        info.rank,
        total,
        seconds,
        total / max(seconds, 1e-9),
        failed,
    )


def _fill(cfg: EncodeConfig, source, vae, spec: StoreSpec, buf: ShardBuffer, batch: Batch) -> int:
    """Encode one batch into its shard buffer; returns how many of its images failed."""
    for index, reason in batch.failures:
        buf.failures.append(Failure(index=index, key=source.key(index), reason=reason))
        log.warning("skipping %s: %s", source.key(index), reason)
    buf.seen += len(batch.indices)
    if not batch.ok:
        return len(batch.failures)
    mean, logstd = _encode_batch(cfg, source, vae, batch)
    rows = np.asarray(batch.ok) - buf.start
    q, clipped = quantize(mean, spec.quant)
    buf.latents[rows] = q.cpu().numpy()
    buf.clipped += clipped
    if logstd is not None:
        buf.logstd[rows] = quantize(logstd, spec.logstd_quant)[0].cpu().numpy()
    buf.labels[rows] = [source.label(i) for i in batch.ok]
    buf.modes.update(batch.modes)
    return len(batch.failures)


def _too_many(cfg: EncodeConfig, source, failed: int, limit: int, buf: ShardBuffer) -> str:
    example = f"latest: {buf.failures[-1].key}: {buf.failures[-1].reason}" if buf.failures else ""
    return (
        f"{failed} images failed to decode, more than --max-failures {cfg.max_failures} allows "
        f"({limit} of {len(source)}; {example}). Complete shards are kept: fix or remove the "
        "bad files and re-run, or raise --max-failures"
    )
