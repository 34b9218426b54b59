"""The demo's Inception FIDs (ADM's evaluator, `evaluation`): samples, the VAE floor, real sets.

Three Fréchet distances in Inception pool_3 space against the held-out half A, each from sets of
the same size (FID is biased upwards for small sets, so only same-sized figures compare):
generated samples; held-out half B encoded and decoded by the VAE (the reconstruction floor: a
DiT that learned the latents perfectly would score about this); and half B itself (real vs real).

    latentdit evaluate demo_out/samples --ref demo_out/data/val    # the same metric, by hand
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from demo.data import as_tensor, load_split
from demo.verdict import split_halves
from evaluation.features import extract_features
from evaluation.inputs import array_images
from evaluation.metrics import GaussianStats, frechet_distance
from evaluation.network import InceptionFeatures, load_inception
from foundation.vae import VaeConfig, decode_latents, load_autoencoder

log = logging.getLogger(__name__)

BATCH = 50


def per_class(images: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The first `n` images of every class, class by class."""
    return np.concatenate([images[labels == c][:n] for c in np.unique(labels)])


@torch.no_grad()
def reconstruct(images: np.ndarray, vae_dir: Path) -> np.ndarray:
    """uint8 images through the VAE: posterior mean, then the decoder."""
    vae = load_autoencoder(VaeConfig(id=str(vae_dir), channels_last=False))
    out = []
    for i in range(0, len(images), BATCH):
        z = vae.encode(as_tensor(images[i : i + BATCH])).latent_dist.mean
        out.append(decode_latents(vae, z).numpy())
    return np.concatenate(out)


def inception_fids(sets: dict[str, np.ndarray], net: InceptionFeatures) -> dict[str, float]:
    """FID of each named set against sets["real_a"]."""
    stats = {}
    for name, images in sets.items():
        f = extract_features(array_images(name, name, images), [net], batch_size=BATCH)
        stats[name] = GaussianStats.of(f.features["pool_3"])
    return {k: frechet_distance(v, stats["real_a"]) for k, v in stats.items() if k != "real_a"}


def demo_inception(data: Path, generated: np.ndarray, asked: np.ndarray, *, vae_dir: Path,
                   images_per_class: int, inception: Path | None = None) -> dict:  # fmt: skip
    """{"fid_generated", "fid_reconstruction", "fid_real_vs_real", "images_per_set", network}
    of `generated` (asked for classes `asked`) against the halves of `data`'s held-out split."""
    real, labels = load_split(data, "val")
    (real_a, labels_a), (real_b, labels_b) = split_halves(real, labels)
    net = load_inception(inception)
    n = min(images_per_class, np.bincount(asked).min(), np.bincount(labels_a).min(),
            np.bincount(labels_b).min())  # fmt: skip
    real_b = per_class(real_b, labels_b, n)
    fids = inception_fids(
        {
            "real_a": per_class(real_a, labels_a, n),
            "generated": per_class(generated, asked, n),
            "reconstruction": reconstruct(real_b, vae_dir),
            "real_vs_real": real_b,
        },
        net,
    )
    log.info("Inception FIDs: %s", fids)
    return {
        "fid_generated": fids["generated"],
        "fid_reconstruction": fids["reconstruction"],
        "fid_real_vs_real": fids["real_vs_real"],
        "images_per_set": int(n * len(np.unique(asked))),
        "network_sha1": net.sha1,
    }
