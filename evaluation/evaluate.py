"""`latentdit evaluate`: FID, sFID, Inception Score, precision and recall as ADM computes them.

    latentdit evaluate samples_50000x256x256x3.npz --ref VIRTUAL_imagenet256_labeled.npz
    latentdit evaluate val_images/ --save-stats val_stats.npz     # featurize a reference once
    latentdit evaluate samples/ --ref val_stats.npz --json

SAMPLES and REF may each be any input of `evaluation.inputs`. Without --ref only the Inception
Score is computed; a metric the inputs or the network cannot give is null, with its reason.

    torchrun --standalone --nproc_per_node=8 cli.py -- evaluate samples.npz --ref ref.npz --json

Under torchrun each rank featurizes its share of every image set (`evaluation.features.featurize`);
rank 0 computes the statistics and the metrics and writes --save-stats; every rank returns the
same result.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.config import EvaluateConfig
from evaluation.errors import EvaluationError

log = logging.getLogger(__name__)

METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


@dataclass
class SetStats:
    """What the metrics need of one set: statistics, and the features when there are any."""

    kind: str
    path: str
    count: int | None
    stats: dict[str, np.ndarray]  # mu, sigma (pool_3), mu_s, sigma_s (spatial)
    pool: np.ndarray | None = None
    spatial: np.ndarray | None = None
    images_per_s: float | None = None
    skipped: int = 0  # image files skipped (not regular files, decompression bombs, corrupt)


def summarize(path: str | Path, cfg: EvaluateConfig, net, device: str) -> SetStats | None:
    """Open `path`, featurize its images (if it has any) and compute ADM's statistics.

    Every rank must call it (each featurizes its share); the statistics are on rank 0, None on
    the other ranks.
    """
    from evaluation.features import featurize
    from evaluation.inputs import DecodeLimits, StatsFile, open_input

    decode = DecodeLimits(max_pixels=cfg.max_pixels, max_file_mb=cfg.max_file_mb)
    opened = open_input(path, limit=cfg.limit, workers=cfg.workers, vae=cfg.vae, device=device,
                        storage_options=cfg.store_options, decode=decode)  # fmt: skip
    if isinstance(opened, StatsFile):
        if opened.network_sha1 not in (None, net.sha1):
            raise EvaluationError(
                f"{path}: its features come from network {opened.network_sha1}, this run uses "
                f"{net.sha1}; recompute the stats with this network or pass its --inception"
            )
        return SetStats("stats", str(path), opened.count, opened.stats, opened.pool, opened.spatial)
    if opened.count < 2:
        raise EvaluationError(f"{path}: {opened.count} image(s); statistics need at least 2")
    f = featurize(opened, net, batch_size=cfg.batch_size, device=device)
    if f is None:  # another rank than 0
        return None
    s = set_stats(opened.kind, path, f)
    s.skipped = opened.skipped + opened.count - s.count  # listed, then failed to decode
    if s.skipped:
        log.warning("%s: %d image files skipped (see the warnings above)", path, s.skipped)
    if opened.stats:  # a reference batch's own statistics win, as in ADM
        s.stats = opened.stats
    return s


def set_stats(kind: str, path: Path | str, f) -> SetStats:
    """ADM's statistics of a set's features (`evaluation.features.SetFeatures`)."""
    from evaluation.metrics import GaussianStats

    pool, spatial = GaussianStats.of(f.pool), GaussianStats.of(f.spatial)
    stats = {"mu": pool.mu, "sigma": pool.sigma, "mu_s": spatial.mu, "sigma_s": spatial.sigma}
    return SetStats(kind, str(path), len(f.pool), stats, f.pool, f.spatial, f.images_per_s)


def save_stats(s: SetStats, out: Path, network_sha1: str) -> Path:
    """ADM's mu, sigma, mu_s, sigma_s plus the features (pool_3, spatial), written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.npz")
    extra = {k: v for k, v in (("pool_3", s.pool), ("spatial", s.spatial)) if v is not None}
    np.savez(tmp, **s.stats, **extra, network_sha1=np.array(network_sha1))
    os.replace(tmp, out)
    return out


def compare(
    samples: SetStats, ref: SetStats | None, net, device: str = "cpu"
) -> tuple[dict, dict, list[str]]:
    """(metrics, reasons for the null ones, warnings) of `samples` against `ref`."""
    import torch

    from evaluation.metrics import (
        GaussianStats,
        frechet_distance,
        inception_score,
        precision_recall,
    )

    values: dict[str, Any] = dict.fromkeys(METRICS)
    reasons, warnings = {}, []
    if samples.pool is None:
        reasons["inception_score"] = "SAMPLES is a statistics file without pool_3 features"
    elif net.logits_weight is None:
        reasons["inception_score"] = (
            f"the network ({net.name}) has no logits layer; pass --inception with a port that "
            "has one (e.g. StyleGAN3's inception-2015-12-05.pt)"
        )
    else:
        values["inception_score"] = inception_score(
            net.probs(torch.from_numpy(samples.pool)).numpy()
        )
    if ref is None:
        for k in ("fid", "sfid", "precision", "recall"):
            reasons[k] = "no --ref"
        return values, reasons, warnings
    for key, mu, sigma in (("fid", "mu", "sigma"), ("sfid", "mu_s", "sigma_s")):
        a = GaussianStats(samples.stats[mu], samples.stats[sigma])
        b = GaussianStats(ref.stats[mu], ref.stats[sigma])
        if a.mu.shape != b.mu.shape:
            raise EvaluationError(
                f"{key}: statistics of {a.mu.shape[0]} and {b.mu.shape[0]} "
                "features; both sets need the same network"
            )
        values[key] = frechet_distance(a, b)
    dims = len(samples.stats["mu"])
    for s in (samples, ref):
        if s.count is not None and s.count < dims:  # a rank-deficient covariance
            warnings.append(
                f"{s.path}: {s.count} images < {dims} features: FID is "
                "biased upwards; compare only figures of the same set sizes"
            )
    if samples.pool is None or ref.pool is None:
        reasons["precision"] = reasons["recall"] = "a statistics file without pool_3 features"
    elif min(len(samples.pool), len(ref.pool)) <= 3:
        reasons["precision"] = reasons["recall"] = "need more than k = 3 images in each set"
    else:
        values["precision"], values["recall"] = precision_recall(
            ref.pool, samples.pool, device=device
        )
    return values, reasons, warnings


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score cfg.samples (against cfg.ref); write --save-stats; return the result record.

    Under torchrun (or inside a process group) every rank featurizes its share of each set and
    returns the same record; rank 0 alone writes --save-stats.
    """
    from evaluation.network import load_inception
    from foundation.distributed import on_main, process_group

    with process_group(cfg.device) as info:
        device = str(info.device)
        net = load_inception(cfg.inception, device=device)
        samples = summarize(cfg.samples, cfg, net, device)
        ref = summarize(cfg.ref, cfg, net, device) if cfg.ref is not None else None
        return on_main(lambda: _score(cfg, samples, ref, net, device, ranks=info.world_size))


def _score(cfg: EvaluateConfig, samples: SetStats, ref: SetStats | None, net, device: str,
           ranks: int) -> dict[str, Any]:  # fmt: skip
    """The result record of `evaluate` from both sets' statistics (on rank 0)."""
    if cfg.save_stats is not None:
        save_stats(samples, Path(cfg.save_stats), net.sha1)
    values, reasons, warnings = compare(samples, ref, net, device)
    for w in warnings:
        log.warning(w)

    def describe(s: SetStats | None) -> dict | None:
        if s is None:
            return None
        shown = ("kind", "path", "count", "images_per_s", "skipped")
        return {k: v for k, v in asdict(s).items() if k in shown}

    return {
        **values,
        "null_reasons": reasons,
        "samples": describe(samples),
        "ref": describe(ref),
        "network": {"name": net.name, "sha1": net.sha1},
        "ranks": ranks,
        "warnings": warnings,
        "save_stats": None if cfg.save_stats is None else str(cfg.save_stats),
    }


def format_result(r: dict[str, Any]) -> str:
    """The human-readable table of an `evaluate` result."""
    names = {"fid": "FID", "sfid": "sFID", "inception_score": "Inception Score",
             "precision": "Precision", "recall": "Recall"}  # fmt: skip
    lines = []
    for role in ("samples", "ref"):
        if r[role] is not None:
            s = r[role]
            count = "" if s["count"] is None else f", {s['count']} images"
            count += f", {s['skipped']} files skipped" if s.get("skipped") else ""
            lines.append(f"{role:<16} {s['path']} ({s['kind']}{count})")
    lines.append(f"{'network':<16} {r['network']['name']} (sha1 {r['network']['sha1'][:12]})")
    for key, name in names.items():
        value = r[key]
        shown = f"{value:.4f}" if value is not None else f"-  ({r['null_reasons'][key]})"
        lines.append(f"{name:<16} {shown}")
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)
