"""Sample a checkpoint into PNGs, a grid and the ADM `.npz`, decoding with the VAE decoder only.

    latentdit sample runs/dit-b2 --out samples/ --class "golden retriever" --n 8 --cfg 4

`sample(SampleConfig(...))` is what the CLI calls. Images are made in batches of the indices not
yet finished in OUT, so re-running the same command resumes an interrupted run.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from foundation.distributed import resolve_device
from foundation.precision import NAMES as PRECISION_NAMES
from foundation.precision import autocast, resolve_precision
from sampler import outputs
from sampler.decoder import LatentDecoder
from sampler.errors import SamplerError
from sampler.latents import SolveConfig, make_latents, pick_solver
from sampler.plan import ImageNoise, plan_labels
from trainer.checkpoint import load_for_inference, resolve_checkpoint
from trainer.objective import objective_from_meta

log = logging.getLogger(__name__)

WEIGHTS = ("ema", "model")


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """What to sample, how, and where to write it."""

    checkpoint: Path
    """A run dir (its latest checkpoint) or a checkpoint folder RUN/checkpoints/0005000."""
    out: Path
    """Output folder: images/, grid.png, the .npz and sample.json (resume state)."""
    vae: str | None = None
    """VAE folder or hub id to decode with; None: the one recorded in the checkpoint."""
    weights: str = "ema"
    """Which weights to sample: "ema" or "model"."""
    classes: tuple[str, ...] = ()
    """Classes by index, id (wnid) or name; empty: random classes (or all, with fid_samples)."""
    n: int = 8
    """Images per requested class; with no class, images of random classes in total."""
    fid_samples: int | None = None
    """Class-balanced FID set: exactly fid_samples / num_classes images of every class."""
    first_index: int = 0
    """Global index of the first image: regenerate image i alone with first_index=i, n=1."""
    solve: SolveConfig = field(default_factory=SolveConfig)
    """Solver, steps, guidance: how latents are made from noise."""
    seed: int = 0
    """Run seed; image i's noise comes from its own generator seeded by (seed, i)."""
    batch_size: int = 16
    """Images per batch (guided batches run 2x rows through the model)."""
    png: bool = True
    """Write one PNG per image."""
    grid: bool = True
    """Write grid.png with the first images."""
    npz: bool = False
    """Write the ADM evaluator's .npz (uint8 NHWC under arr_0), resumable."""
    device: str | None = None
    """Torch device; None: cuda when available, else cpu."""
    precision: str | None = None
    """Autocast dtype for the model and decoder: fp32, bf16 or fp16; None: bf16 on cuda, fp32 on cpu."""

    def __post_init__(self) -> None:
        checks = [
            (self.n >= 1, f"--n must be >= 1, got {self.n}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (self.first_index >= 0, f"--first-index must be >= 0, got {self.first_index}"),
            (self.weights in WEIGHTS, f"--weights must be one of {WEIGHTS}, got {self.weights!r}"),
            (
                self.precision is None or self.precision in PRECISION_NAMES,
                f"--precision {self.precision!r} is not one of {', '.join(PRECISION_NAMES)}",
            ),
            (
                self.fid_samples is None or (self.fid_samples >= 1 and not self.classes),
                "--fid-samples makes every class; give it without --class, and >= 1",
            ),
            (
                self.fid_samples is None or self.first_index == 0,
                "--first-index does not apply with --fid-samples",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplerError(message)


@dataclass(frozen=True)
class SampleResult:
    """Where the images went, and how fast they came."""

    out: Path
    made: int  # images made by this call (0 when everything was already done)
    total: int
    npz: Path | None
    seconds: float


def _device(cfg: SampleConfig) -> torch.device:
    return resolve_device(cfg.device)


def _settings(
    cfg: SampleConfig, sampler: str, folder: Path, meta: dict, labels: np.ndarray
) -> dict:
    """The settings that determine the images; a resumed run must match them exactly."""
    solve = cfg.solve
    return {
        "checkpoint": str(folder.resolve()),
        "step": meta.get("step"),
        "weights": cfg.weights,
        "sampler": sampler,
        **{k: getattr(solve, k) for k in ("steps", "cfg", "shift", "eta")},
        "cfg_interval": list(solve.cfg_interval) if solve.cfg_interval else None,
        "seed": cfg.seed,
        "first_index": cfg.first_index,
        "vae": cfg.vae or meta["vae"]["id"],
        "count": len(labels),
        "labels_blake2b": hashlib.blake2b(labels.tobytes(), digest_size=16).hexdigest(),
    }


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
    pick_solver(cfg.solve, objective)  # refuse a solver of the other kind before loading the VAE
    revision = meta["vae"].get("revision") if cfg.vae is None else None
    decoder = LatentDecoder.load(
        cfg.vae or meta["vae"]["id"], meta, revision=revision, device=device
    )
    return folder, model, meta, objective, decoder


def sample(cfg: SampleConfig) -> SampleResult:
    """Make the configured images; resumes when OUT holds an interrupted run of the same settings."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SamplerError(
            f"--out {out}: a file, not a folder; choose a new or earlier --out folder"
        )
    device = _device(cfg)
    precision = resolve_precision(cfg.precision, device)
    folder, model, meta, objective, decoder = _load(cfg, device)
    classes, latent_shape = meta["classes"], tuple(meta["latent_shape"])
    labels = plan_labels(
        classes=classes, requested=cfg.classes, n=cfg.n, fid_samples=cfg.fid_samples, seed=cfg.seed
    )
    sampler_name = pick_solver(cfg.solve, objective)[0]
    outputs.check_manifest(out, _settings(cfg, sampler_name, folder, meta, labels))
    image_shape = (*(d * decoder.downsampling for d in latent_shape[1:]), 3)
    npz = outputs.npz_path(out, len(labels), image_shape) if cfg.npz else None

    indices = range(cfg.first_index, cfg.first_index + len(labels))
    class_of = dict(zip(indices, labels.tolist(), strict=True))
    class_ids = {i: classes[c]["id"] for i, c in class_of.items()}
    todo = [] if npz is not None and npz.is_file() else _todo(cfg, out, indices, class_ids)
    log.info(
        "sampling %d of %d images (%s, %d steps, cfg %s) from %s step %s",
        len(todo), len(labels), sampler_name, cfg.solve.steps, cfg.solve.cfg, folder, meta.get("step"),
    )  # fmt: skip
    grid_indices = set(list(indices)[: outputs.GRID_MAX] if cfg.grid else [])
    grid_cache: dict[int, np.ndarray] = {}
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc="sample")
    for batch in _batches(todo, cfg.batch_size):
        y = torch.tensor([class_of[i] for i in batch])
        z = make_latents(
            model, objective, y, ImageNoise(cfg.seed, batch), cfg.solve,
            latent_shape=latent_shape, device=device, precision=precision,
        )  # fmt: skip
        with autocast(device, precision):
            images = decoder(z).numpy()
        _write_batch(cfg, out, batch, images, class_ids)
        grid_cache.update((i, im) for i, im in zip(batch, images, strict=True) if i in grid_indices)
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - start
    if todo:
        rate = len(todo) / seconds
        log.info("made %d images in %.1f s (%.2f images/s)", len(todo), seconds, rate)
    if grid_indices:
        _write_grid(cfg, out, sorted(grid_indices), class_ids, grid_cache)
    if npz is not None and not npz.is_file():
        outputs.assemble_npz(out, cfg.first_index, len(labels), image_shape)
        log.info("wrote %s", npz)
    return SampleResult(out=out, made=len(todo), total=len(labels), npz=npz, seconds=seconds)


def _write_batch(
    cfg: SampleConfig, out: Path, batch: list[int], images: np.ndarray, class_ids: dict[int, str]
) -> None:
    """PNGs first, then the npz part: the part marks the batch finished."""
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
