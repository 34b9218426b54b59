"""The metrics of two sets' statistics and features: each space's statistics by its own formulas,
the Fréchet distances of `evaluation.spaces`, the Inception Score, precision and recall.

    samples = set_stats("npz", path, features, nets)
    values, null_reasons, warnings = compare(samples, ref, nets, ("fid", "fd_dinov2"))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.errors import EvaluationError
from evaluation.metrics import FORMULAS, GaussianStats, inception_score, precision_recall
from evaluation.spaces import GAUSSIANS, INCEPTION, METRICS, RESULT_LABELS, SPACE_OF, SPACES


@dataclass
class SetStats:
    """What the metrics need of one set: the Gaussians' statistics (keys of `evaluation.spaces`),
    the features when there are any, and the networks that made them."""

    kind: str
    path: str
    count: int | None
    stats: dict[str, np.ndarray]
    features: dict[str, np.ndarray] = field(default_factory=dict)
    networks: dict[str, dict] = field(default_factory=dict)
    images_per_s: float | None = None
    warnings: list[str] = field(default_factory=list)
    skipped: int = 0  # image files skipped (not regular files, decompression bombs, corrupt)

    def gaussian(self, key: str) -> GaussianStats:
        """The GaussianStats of features `key` (e.g. "pool_3")."""
        g = GAUSSIANS[key]
        return GaussianStats(self.stats[g.mu], self.stats[g.sigma])


def set_stats(kind: str, path: Path | str, f, nets: dict[str, Any]) -> SetStats:
    """The statistics of a set's features (`evaluation.features.SetFeatures`), each space's by
    its own formulas (ADM's for Inception, EDM2's for DINOv2)."""
    stats = {}
    for key, features in f.features.items():
        g, space = GAUSSIANS[key], SPACES[SPACE_OF[key]]
        s = FORMULAS[space.formulas][0](features)
        stats[g.mu], stats[g.sigma] = s.mu, s.sigma
    networks = {space: net.identity for space, net in nets.items()}
    return SetStats(kind, str(path), f.count, stats, dict(f.features), networks, f.images_per_s)


def _inception_score(samples: SetStats, ref, nets, device) -> tuple[dict, str | None]:
    net = nets[INCEPTION]
    if "pool_3" not in samples.features:
        return {}, "SAMPLES is a statistics file without pool_3 features"
    if net.logits_weight is None:
        return {}, (
            f"the network ({net.name}) has no logits layer; pass --inception with a port "
            "that has one (e.g. StyleGAN3's inception-2015-12-05.pt)"
        )
    probs = net.probs(torch.from_numpy(samples.features["pool_3"])).numpy()
    return {"inception_score": inception_score(probs)}, None


def _precision_recall(samples: SetStats, ref, nets, device) -> tuple[dict, str | None]:
    if ref is None:
        return {}, "no --ref"
    if "pool_3" not in samples.features or "pool_3" not in ref.features:
        return {}, "a statistics file without pool_3 features"
    if min(len(samples.features["pool_3"]), len(ref.features["pool_3"])) <= 3:
        return {}, "need more than k = 3 images in each set"
    p, r = precision_recall(ref.features["pool_3"], samples.features["pool_3"], device=device)
    return {"precision": p, "recall": r}, None


def _frechet(name: str):
    def compute(samples: SetStats, ref, nets, device) -> tuple[dict, str | None]:
        m = METRICS[name]
        if ref is None:
            return {}, "no --ref"
        a, b = samples.gaussian(m.gaussian), ref.gaussian(m.gaussian)
        if a.mu.shape != b.mu.shape:
            raise EvaluationError(
                f"{name}: statistics of {a.mu.shape[0]} and {b.mu.shape[0]} "
                "features; both sets need the same network"
            )
        return {name: FORMULAS[SPACES[m.space].formulas][1](a, b)}, None

    return compute


COMPUTE = {"is": _inception_score, "pr": _precision_recall} | {
    name: _frechet(name) for name, m in METRICS.items() if m.gaussian is not None
}


def compare(
    samples: SetStats,
    ref: SetStats | None,
    nets: dict[str, Any],
    metrics: tuple[str, ...],
    device: str = "cpu",
) -> tuple[dict, dict, list[str]]:
    """(metrics, reasons for the null ones, warnings) of `samples` against `ref`."""
    values: dict[str, Any] = dict.fromkeys(RESULT_LABELS)
    reasons = {k: "not in --metrics" for k in RESULT_LABELS}
    warnings: list[str] = []
    for name in metrics:
        got, reason = COMPUTE[name](samples, ref, nets, device)
        values.update(got)
        for key in METRICS[name].results:
            reasons.pop(key)
            if reason is not None:
                reasons[key] = reason
        g = METRICS[name].gaussian
        for s in (samples, ref) if g is not None and got else ():
            dims = len(s.stats[GAUSSIANS[g].mu])
            if s.count is not None and s.count < dims:  # a rank-deficient covariance
                label = RESULT_LABELS[name]
                warnings.append(
                    f"{s.path}: {s.count} images < {dims} features: {label} is "
                    "biased upwards; compare only figures of the same set sizes"
                )
    return values, reasons, warnings
