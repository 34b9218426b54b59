"""The demo's Inception FIDs (ADM's evaluator, `evaluation`): samples, the VAE floor, real sets.

Three Fréchet distances in Inception pool_3 space against the held-out half A, each from sets of
the same size (FID is biased upwards for small sets, so only same-sized figures compare):
generated samples; held-out half B encoded and decoded by the VAE (the reconstruction floor: a
DiT that learned the latents perfectly would score about this); and half B itself (real vs real).
The held-out sets are the same in every default demo run: their statistics ship with the demo
(`demo.heldout`), so a run featurizes only its samples.

    latentdit evaluate demo_out/samples --ref demo_out/data/val    # the same metric, by hand
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from demo import heldout
from demo.data import load_split
from demo.heldout import HeldOut
from demo.verdict import split_halves
from evaluation.features import extract_features
from evaluation.inputs import array_images
from evaluation.metrics import GaussianStats, frechet_distance
from evaluation.network import InceptionFeatures, load_inception
from foundation.autoencoders.loading import VaeConfig, load_autoencoder

log = logging.getLogger(__name__)

BATCH = 50


def per_class(images: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The first `n` images of every class, class by class."""
    return np.concatenate([images[labels == c][:n] for c in np.unique(labels)])


@torch.no_grad()
def reconstruct(images: np.ndarray, vae_dir: Path) -> np.ndarray:
    """uint8 images through the VAE: posterior mean, then the decoder."""
    ae = load_autoencoder(VaeConfig(id=str(vae_dir), channels_last=False))
    out = []
    for i in range(0, len(images), BATCH):
        pixels = torch.from_numpy(images[i : i + BATCH]).permute(0, 3, 1, 2)
        out.append(ae.decode_to_uint8(ae.encode(ae.to_input(pixels))[0]).numpy())
    return np.concatenate(out)


def inception_fids(
    sets: dict[str, np.ndarray],
    net: InceptionFeatures,
    *,
    reference: np.ndarray | None = None,
    keep: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """FID of each named set against the reference: the pool_3 features `reference`, else the
    set "real_a"; `keep` receives each set's features."""
    features = {} if keep is None else keep
    for name, images in sets.items():
        f = extract_features(array_images(name, name, images), [net], batch_size=BATCH)
        features[name] = f.features["pool_3"]
    ref = GaussianStats.of(features["real_a"] if reference is None else reference)
    return {
        k: frechet_distance(GaussianStats.of(v), ref) for k, v in features.items() if k != "real_a"
    }


def heldout_sets(data: Path, vae_dir: Path, images_per_class: int, asked: np.ndarray) -> HeldOut:
    """Each held-out half of `data`, n images of every class: n = images_per_class, or fewer
    when a half or the samples (asked for classes `asked`) have fewer of some class."""
    real, labels = load_split(data, "val")
    (real_a, labels_a), (real_b, labels_b) = split_halves(real, labels)
    counts = [np.bincount(x).min() for x in (asked, labels_a, labels_b)]
    n = int(min(images_per_class, *counts))
    return HeldOut(per_class(real_a, labels_a, n), per_class(real_b, labels_b, n), n, Path(vae_dir))


def demo_inception(
    data: Path,
    generated: np.ndarray,
    asked: np.ndarray,
    *,
    vae_dir: Path,
    images_per_class: int,
    inception: Path | None = None,
) -> dict:
    """{"fid_generated", "fid_reconstruction", "fid_real_vs_real", "images_per_set", network,
    where the held-out statistics came from} of `generated` (asked for classes `asked`) against
    the halves of `data`'s held-out split. The shipped statistics (`demo.heldout`) stand for the
    held-out sets when they were made from them with this network; else they are computed."""
    net = load_inception(inception)
    held = heldout_sets(data, vae_dir, images_per_class, asked)
    n = held.per_class
    shipped = heldout.load(heldout.HELDOUT_FILE, held.identity(net.sha1))
    stats = shipped or heldout.compute(held, net, inception_fids)
    fid = inception_fids(
        {"generated": per_class(generated, asked, n)}, net, reference=stats["real_a"]
    )
    log.info(
        "Inception FIDs: generated %.2f, held-out statistics %s",
        fid["generated"],
        "shipped" if shipped else "computed",
    )
    return {
        "fid_generated": fid["generated"],
        "fid_reconstruction": stats["fid_reconstruction"],
        "fid_real_vs_real": stats["fid_real_vs_real"],
        "images_per_set": int(n * len(np.unique(asked))),
        "network_sha1": net.sha1,
        "heldout_statistics": str(heldout.HELDOUT_FILE) if shipped else "computed in this run",
    }
