"""Sample a checkpoint into PNGs, a grid and the ADM `.npz`, decoding with the VAE decoder only.

    latentdit sample runs/dit-b2 --out samples/ --class "golden retriever" --n 8 --cfg 4

`sample(SampleConfig(...))` is what the CLI calls. Images are made in batches of the indices not
yet finished in OUT, so re-running the same command resumes an interrupted run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from foundation.distributed import DistInfo, barrier
from foundation.precision import Precision, autocast, resolve_precision
from foundation.preemption import StopSignals, stopped
from sampler import outputs, ranks
from sampler.batch_size import BatchProbe, CudaFits, pick_batch_size
from sampler.config import SampleConfig
from sampler.decoder import LatentDecoder
from sampler.errors import SamplerError
from sampler.inference import InferenceModel
from sampler.latents import make_latents, pick_solver
from sampler.manifest import check_manifest, legacy_defaults, run_settings
from sampler.plan import FileNoise, ImageNoise, plan_labels
from sampler.writer import BatchWriter, HostImages
from trainer.checkpoint import load_for_inference, resolve_checkpoint
from trainer.model import REG_KEY
from trainer.objective import objective_from_meta
from trainer.reg import pack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleResult:
    """Where the images went, and how fast they came."""

    out: Path
    made: int  # images made by this call, by all ranks (0 when everything was already done)
    total: int
    npz: Path | None
    seconds: float
    batch_size: int  # the batch size used (what --auto-batch found, on CUDA)
    probe: BatchProbe | None = None  # the --auto-batch trials, when it probed


def _read_noise(cfg: SampleConfig, count: int, latent_shape: tuple[int, ...]) -> np.ndarray | None:
    """The --noise array, checked to hold one (C, H, W) row per image."""
    if cfg.noise is None:
        return None
    try:
        rows = np.load(cfg.noise)
    except (OSError, ValueError) as e:
        raise SamplerError(f"--noise {cfg.noise}: not a .npy array ({e})") from None
    if rows.shape != (count, *latent_shape):
        raise SamplerError(
            f"--noise {cfg.noise}: shape {rows.shape}, need {(count, *latent_shape)} (one row per image)"
        )
    return rows


def _todo(cfg: SampleConfig, out: Path, indices: range, class_ids: dict[int, str]) -> list[int]:
    """Indices still to make: not in a finished npz part (with --npz), or without a PNG."""
    if cfg.npz:
        done = set()
        for start, stop in outputs.done_parts(out):
            done.update(range(start, stop))
        return [i for i in indices if i not in done]
    return [i for i in indices if not outputs.png_path(out, i, class_ids[i], cfg.seed).is_file()]


def _batches(todo: list[int], size: int) -> list[list[int]]:
    """Runs of consecutive indices, cut into batches of at most `size`."""
    batches: list[list[int]] = []
    for i in todo:
        if batches and len(batches[-1]) < size and batches[-1][-1] == i - 1:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _load(cfg: SampleConfig, device: torch.device):
    """(checkpoint folder, model, meta, objective, decoder), each checked against the others."""
    if not Path(cfg.checkpoint).exists():
        raise SamplerError(f"{cfg.checkpoint}: no such run dir or checkpoint folder")
    folder = resolve_checkpoint(cfg.checkpoint)
    model, meta = load_for_inference(folder, weights=cfg.weights, device=device)
    objective = objective_from_meta(meta["objective"])
    learn_sigma, token = bool(model.config.get("learn_sigma")), REG_KEY in model.config
    pick_solver(cfg.solve, objective, learn_sigma=learn_sigma, class_token=token)  # before the VAE
    revision = meta["vae"].get("revision") if cfg.vae is None else None
    decoder = LatentDecoder.load(
        cfg.vae or meta["vae"]["id"], meta, revision=revision, device=device
    )
    return folder, model, meta, objective, decoder


def sample(cfg: SampleConfig) -> SampleResult:
    """Make the configured images; resumes when OUT holds an interrupted run of the same settings.

    Under torchrun every rank makes its share of the batches (`sampler.ranks`); rank 0 writes the
    manifest, the grid and the final `.npz`.
    """
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise SamplerError(
            f"--out {cfg.out}: a file, not a folder; choose a new or earlier --out folder"
        )
    with ranks.process_group(cfg.device) as info:
        return _sample(cfg, info)


def _sample(cfg: SampleConfig, info: DistInfo) -> SampleResult:
    device = info.device
    precision = resolve_precision(cfg.precision, device)
    if cfg.cast_weights and precision is Precision.fp32:
        raise SamplerError("--cast-weights casts to the --precision dtype: give --precision bf16")
    folder, model, meta, objective, decoder = _load(cfg, device)
    net = InferenceModel(
        model, compile=cfg.compile, weights_dtype=precision.dtype if cfg.cast_weights else None
    )
    classes, latent_shape = meta["classes"], tuple(meta["latent_shape"])
    labels = plan_labels(
        classes=classes, requested=cfg.classes, n=cfg.n, fid_samples=cfg.fid_samples, seed=cfg.seed
    )
    sampler_name = pick_solver(cfg.solve, objective, learn_sigma=model.config.get("learn_sigma"))[0]
    noise_rows = _read_noise(cfg, len(labels), latent_shape)
    out = Path(cfg.out)
    settings = run_settings(cfg, sampler_name, folder, meta, labels, precision=precision)
    image_shape = (*(d * decoder.downsampling for d in latent_shape[1:]), 3)
    npz = outputs.npz_path(out, len(labels), image_shape) if cfg.npz else None

    indices = range(cfg.first_index, cfg.first_index + len(labels))
    class_of = dict(zip(indices, labels.tolist(), strict=True))
    class_ids = {i: classes[c]["id"] for i, c in class_of.items()}

    def todo() -> list[int]:
        check_manifest(out, settings, legacy=legacy_defaults(device))
        return [] if npz is not None and npz.is_file() else _todo(cfg, out, indices, class_ids)

    todo_all = ranks.on_main(todo, info)
    batch_size, probe = _batch_size(cfg, net, decoder, latent_shape, precision, len(todo_all), info)
    mine = ranks.share(_batches(todo_all, batch_size), info)
    log.info(
        "sampling %d of %d images (%s, %d steps, cfg %s) from %s step %s on %d rank(s)",
        len(todo_all), len(labels), sampler_name, cfg.solve.steps, cfg.solve.cfg, folder,
        meta.get("step"), info.world_size,
    )  # fmt: skip
    grid_indices = set(list(indices)[: outputs.GRID_MAX] if cfg.grid else [])
    grid_cache: dict[int, np.ndarray] = {}
    start = time.perf_counter()
    bar = tqdm(total=sum(map(len, mine)), unit="img", desc="sample", disable=not info.is_main)
    stop, made_here = StopSignals(), 0  # a signal: the batch in hand is finished and written
    with stop, BatchWriter() as writer:
        for batch in mine:
            if stop.requested:
                break
            y = torch.tensor([class_of[i] for i in batch])
            noise = ImageNoise(cfg.seed, batch) if noise_rows is None else FileNoise(
                noise_rows[[i - cfg.first_index for i in batch]], cfg.seed, batch
            )  # fmt: skip
            z = make_latents(
                net, objective, y, noise, cfg.solve,
                latent_shape=latent_shape, device=device, precision=precision,
            )  # fmt: skip
            if cfg.save_latents:
                raw = decoder.normalization.denormalize(z.float()).cpu().numpy()
                outputs.write_part(out, batch[0], raw, outputs.LATENT_PARTS)
            with autocast(device, precision):
                images = HostImages(decoder(z, to_cpu=False))  # copied while the next batch runs
            keep = grid_indices.intersection(batch)
            writer.submit(_write_batch, cfg, out, batch, images, class_ids, keep, grid_cache)
            bar.update(len(batch))
            made_here += len(batch)
    bar.close()
    seconds = time.perf_counter() - start
    made = ranks.total(made_here)  # also waits for every rank's last write
    if made_here:
        rate = made_here / seconds
        log.info("made %d images in %.1f s (%.2f images/s)", made_here, seconds, rate)
    if signum := stop.agreed():
        finished = len(labels) - len(todo_all) + made
        what = f"stopped with {finished} of {len(labels)} images written to {out}; re-run the "
        raise stopped(signum, what + "same command to make the rest", main=info.is_main)
    if info.is_main and grid_indices:
        _write_grid(cfg, out, sorted(grid_indices), class_ids, grid_cache)
    if info.is_main and npz is not None and not npz.is_file():
        outputs.assemble_npz(out, cfg.first_index, len(labels), image_shape)
        log.info("wrote %s", npz)
    if info.is_main and cfg.save_latents and not (out / outputs.LATENTS).is_file():
        log.info("wrote %s", outputs.assemble_latents(out, cfg.first_index, len(labels)))
    barrier()  # the npz is complete when any rank returns
    return SampleResult(
        out=out, made=made, total=len(labels), npz=npz, seconds=seconds, batch_size=batch_size,
        probe=probe,
    )  # fmt: skip


def _batch_size(
    cfg: SampleConfig,
    net: InferenceModel,
    decoder: LatentDecoder,
    latent_shape: tuple[int, ...],
    precision: Precision,
    todo: int,
    info: DistInfo,
) -> tuple[int, BatchProbe | None]:
    """(batch size, probe): --batch-size, or with --auto-batch on CUDA the largest that fits on
    every rank (the smallest of the ranks' finds, so that all cut the same batches)."""
    if todo == 0:
        return cfg.batch_size, None

    def latent_model(x, t, y):  # a REG model's state holds a class token too: zeros will do
        token = net.config.get(REG_KEY)
        return net.model(pack(x, x.new_zeros(len(x), token)) if token else x, t, y)

    def fits() -> CudaFits:
        return CudaFits(
            latent_model, lambda z: decoder(z, to_cpu=False), latent_shape=latent_shape,
            device=info.device, precision=precision,
        )  # fmt: skip

    cap = None if cfg.auto_batch is None else min(cfg.auto_batch, todo)
    found, probe = pick_batch_size(cfg.batch_size, cap, info.device, fits)
    return ranks.smallest(found), probe


def _write_batch(
    cfg: SampleConfig,
    out: Path,
    batch: list[int],
    host: HostImages,
    class_ids: dict[int, str],
    keep: set[int],
    grid_cache: dict[int, np.ndarray],
) -> None:
    """PNGs first, then the npz part: the part marks the batch finished; `keep` goes to the grid."""
    images = host.numpy()
    grid_cache.update((i, im) for i, im in zip(batch, images, strict=True) if i in keep)
    if cfg.png:
        for i, image in zip(batch, images, strict=True):
            outputs.write_png(outputs.png_path(out, i, class_ids[i], cfg.seed), image)
    if cfg.npz:
        outputs.write_part(out, batch[0], images)


def _write_grid(
    cfg: SampleConfig, out: Path, first: list[int], class_ids: dict, cache: dict[int, np.ndarray]
) -> None:
    """grid.png from the first images: made now, or read back from their PNGs or npz parts."""
    missing = [i for i in first if i not in cache]
    if missing and cfg.png:
        cache.update(
            (i, outputs.read_png(outputs.png_path(out, i, class_ids[i], cfg.seed))) for i in missing
        )
    elif missing and cfg.npz:
        for start, images in outputs.read_parts(out):
            cache.update(
                (i, images[i - start]) for i in missing if start <= i < start + len(images)
            )
    if any(i not in cache for i in first):
        log.warning("no grid: the first images are neither in memory nor on disk")
        return
    outputs.write_png(out / outputs.GRID, outputs.make_grid(np.stack([cache[i] for i in first])))
