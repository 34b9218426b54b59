"""The feature spaces `latentdit evaluate` works in and the metrics each gives, declared once.

    inception  TF Inception-v3 2015-12-05 (ADM's evaluator): pool_3 (2048-d) for FID, the Inception
               Score and precision/recall, mixed_6/conv's first 7 channels (17 x 17 x 7) for sFID;
               ADM's statistics (np.mean / np.cov) and Fréchet distance.
    dinov2     DINOv2 ViT-L/14's class token (1024-d) for FD_DINOv2 (EDM2, Karras et al. 2024);
               EDM2's float64 statistics and Fréchet distance.

`--metrics fid,sfid,is,pr,fd_dinov2` picks metrics; only the spaces they need are featurized. A
stats file (`--save-stats`) holds, per space, each Gaussian's mean and covariance under the keys
below (ADM's own names for Inception, so ADM reference batches read as they are), the features,
and the identity of the network that made them. (Importable without torch: the CLI reads it.)
"""

from __future__ import annotations

from dataclasses import dataclass

from evaluation.errors import EvaluationError

INCEPTION, DINOV2 = "inception", "dinov2"


@dataclass(frozen=True)
class Gaussian:
    """One feature array of a space and where its statistics live in a stats file."""

    features: str  # the features' key, e.g. "pool_3"
    mu: str
    sigma: str


@dataclass(frozen=True)
class FeatureSpace:
    """A network's feature space: its Gaussians, and whose formulas compute their statistics and
    Fréchet distance (`evaluation.metrics.FORMULAS`: "adm" or "edm2")."""

    name: str
    gaussians: tuple[Gaussian, ...]
    formulas: str

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(g.features for g in self.gaussians)


SPACES: dict[str, FeatureSpace] = {
    INCEPTION: FeatureSpace(
        INCEPTION,
        (Gaussian("pool_3", "mu", "sigma"), Gaussian("spatial", "mu_s", "sigma_s")),
        "adm",
    ),
    DINOV2: FeatureSpace(DINOV2, (Gaussian("dinov2", "mu_dinov2", "sigma_dinov2"),), "edm2"),
}
GAUSSIANS = {g.features: g for s in SPACES.values() for g in s.gaussians}
SPACE_OF = {g.features: s.name for s in SPACES.values() for g in s.gaussians}
STATS_KEYS = tuple(k for g in GAUSSIANS.values() for k in (g.mu, g.sigma))
FEATURE_KEYS = tuple(GAUSSIANS)


@dataclass(frozen=True)
class Metric:
    """A metric of `--metrics`: the result keys it fills and the features it needs."""

    name: str
    results: dict[str, str]  # result key: its label
    space: str
    gaussian: str | None = None  # a Fréchet distance between the Gaussians of these features


METRICS: dict[str, Metric] = {
    "fid": Metric("fid", {"fid": "FID"}, INCEPTION, "pool_3"),
    "sfid": Metric("sfid", {"sfid": "sFID"}, INCEPTION, "spatial"),
    "is": Metric("is", {"inception_score": "Inception Score"}, INCEPTION),
    "pr": Metric("pr", {"precision": "Precision", "recall": "Recall"}, INCEPTION),
    "fd_dinov2": Metric("fd_dinov2", {"fd_dinov2": "FD_DINOv2"}, DINOV2, "dinov2"),
}
DEFAULT_METRICS = "fid,sfid,is,pr"
RESULT_LABELS = {k: label for m in METRICS.values() for k, label in m.results.items()}


def parse_metrics(text: str) -> tuple[str, ...]:
    """The metric names of a comma-separated list, in the registry's order; one-line errors."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise EvaluationError(
            f"--metrics {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}; "
            f"choose from {','.join(METRICS)}"
        )
    return tuple(n for n in METRICS if n in names)


def spaces_of(metrics: tuple[str, ...]) -> tuple[str, ...]:
    """The feature spaces the metrics need, in declaration order."""
    needed = {METRICS[m].space for m in metrics}
    return tuple(s for s in SPACES if s in needed)
