"""The evaluators' formulas: ADM's Fréchet distance, Inception Score, precision and recall, and
EDM2's statistics and Fréchet distance (FD_DINOv2).

    fid = frechet_distance(GaussianStats.of(pool_a), GaussianStats.of(pool_b))
    precision, recall = precision_recall(pool_ref, pool_samples)
    fd_dinov2 = edm2_frechet_distance(edm2_stats(dino_a), edm2_stats(dino_b))

ADM's follow openai/guided-diffusion `evaluations/evaluator.py` step by step (docs/evaluate.md):
statistics as np.mean / np.cov; the Fréchet distance through scipy's sqrtm with its eps retry;
IS over splits of 5,000; precision/recall of Kynkäänniemi et al. 2019 with k = 3 and squared
distances computed in float16 first (float32 if any is not finite), in blocks of 10,000 rows.
EDM2's follow NVlabs/edm2 `calculate_metrics.py`: float64 sums of the features and of their outer
products, and the distance's real part taken as a whole (no eps retry, no imaginary-part check).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import scipy
import torch
from scipy import linalg

log = logging.getLogger(__name__)

FID_EPS = 1e-6  # added to both covariance diagonals when the product's sqrtm is not finite
IMAG_ATOL = 1e-3  # largest imaginary part tolerated on sqrtm's diagonal
IS_SPLIT = 5000  # Inception Score split size
NHOOD = 3  # k of the k-NN manifold estimate
PR_BLOCK = 10_000  # rows and columns of one distance block
_SQRTM_HAS_DISP = tuple(int(p) for p in scipy.__version__.split(".")[:2]) < (1, 16)


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and covariance (D, D) of a feature set, as ADM computes them."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> GaussianStats:
        """np.mean (in the features' dtype, float32) and np.cov (float64), rows are samples."""
        return cls(np.mean(features, axis=0), np.cov(features, rowvar=False))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy's sqrtm, quiet as ADM's `disp=False` call (the caller checks the result)."""
    if _SQRTM_HAS_DISP:  # scipy < 1.16 returns (root, error) with disp=False, and prints without
        return linalg.sqrtm(a, disp=False)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = FID_EPS) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2))   (Heusel et al. 2017)."""
    mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
    s1, s2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different sizes: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        log.warning("singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_ATOL):
            raise ValueError(f"sqrtm has an imaginary part {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def edm2_stats(features: np.ndarray) -> GaussianStats:
    """EDM2's statistics (`calculate_stats_for_iterable`): features cast to float64, then
    mu = sum(f) / n and sigma = (f^T f - n mu mu^T) / (n - 1), both float64."""
    f = np.asarray(features, dtype=np.float64)
    n = len(f)
    mu = f.sum(0) / n
    return GaussianStats(mu, (f.T @ f - np.outer(mu, mu) * n) / (n - 1))


def edm2_frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """EDM2's `calculate_metrics_from_stats`: Re(|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)))."""
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"statistics of different sizes: {a.mu.shape} vs {b.mu.shape}")
    m = np.square(a.mu - b.mu).sum()
    s = _sqrtm(np.dot(a.sigma, b.sigma))
    return float(np.real(m + np.trace(a.sigma + b.sigma - s * 2)))


FORMULAS = {  # statistics of (N, D) features, and the Fréchet distance of two such statistics
    "adm": (GaussianStats.of, frechet_distance),
    "edm2": (edm2_stats, edm2_frechet_distance),
}


def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT) -> float:
    """exp(E_x KL(p(y|x) || p(y))) per split of `split_size` rows, averaged over the splits.

    probs: (N, classes) softmax outputs; the last split may be shorter (as in ADM)."""
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def _sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """max(|u|^2 - 2 u.v + |v|^2, 0) for rows u (n, D), v (m, D); in the inputs' dtype."""
    if u.dtype == torch.float16:  # float32 accumulation, float16 results, as GPU GEMMs round
        nu = u.float().square().sum(1).half()
        nv = v.float().square().sum(1).half()
        dot = (u.float() @ v.float().T).half()
    else:
        nu, nv, dot = u.square().sum(1), v.square().sum(1), u @ v.T
    return torch.clamp_min(nu[:, None] - 2 * dot + nv[None, :], 0)


def pairwise_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared distances (n, m) in float32: from float16 features, or float32 if any overflows."""
    d = _sq_distances(u.half(), v.half())
    if torch.isfinite(d).all():
        return d.float()
    return _sq_distances(u.float(), v.float())


def manifold_radii(features: torch.Tensor, k: int = NHOOD, block: int = PR_BLOCK) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest other row (the row itself is the 0th)."""
    radii = []
    for i in range(0, len(features), block):
        d = torch.cat(
            [pairwise_distances(features[i : i + block], features[j : j + block])
             for j in range(0, len(features), block)], dim=1,
        )  # fmt: skip
        radii.append(torch.kthvalue(d, k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(
    ref: np.ndarray, samples: np.ndarray, *, k: int = NHOOD, block: int = PR_BLOCK, device="cpu"
) -> tuple[float, float]:
    """Precision (samples inside the reference manifold) and recall (references inside the
    samples' manifold) of Kynkäänniemi et al. 2019; a point is inside a manifold when it lies
    within the k-NN radius of one of its points."""
    if min(len(ref), len(samples)) <= k:
        raise ValueError(f"precision/recall need more than k={k} features in each set")
    f_ref = torch.as_tensor(ref, dtype=torch.float32, device=device)
    f_smp = torch.as_tensor(samples, dtype=torch.float32, device=device)
    r_ref, r_smp = manifold_radii(f_ref, k, block), manifold_radii(f_smp, k, block)
    ref_in = torch.zeros(len(f_ref), dtype=torch.bool, device=device)
    smp_in = torch.zeros(len(f_smp), dtype=torch.bool, device=device)
    for i in range(0, len(f_ref), block):
        for j in range(0, len(f_smp), block):
            d = pairwise_distances(f_ref[i : i + block], f_smp[j : j + block])
            ref_in[i : i + block] |= (d <= r_smp[None, j : j + block]).any(1)
            smp_in[j : j + block] |= (d <= r_ref[i : i + block, None]).any(0)
    return smp_in.double().mean().item(), ref_in.double().mean().item()
