"""Fréchet distance between two sets of feature vectors (the FID formula, any feature space).

FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))        (Heusel et al. 2017, Eq. 6)

Tr((S_a S_b)^(1/2)) is computed as Tr((A S_b A)^(1/2)) with A = S_a^(1/2): both matrices have the
same eigenvalues, and A S_b A is symmetric positive semi-definite, so two symmetric
eigendecompositions (numpy.linalg.eigh) replace scipy's general matrix square root.
"""

from __future__ import annotations

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64; N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    mu_a, s_a = feature_stats(a)
    mu_b, s_b = feature_stats(b)
    root_a = _sqrt_psd(s_a)
    cross = np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)
    fd = np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(cross).sum()
    return float(max(fd, 0.0))
