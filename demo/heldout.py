"""The demo's held-out Inception statistics, shipped with it as ADM ships its reference batch.

    python -m demo.heldout        # remake demo/assets/heldout_inception.npz (default demo data)

Every demo run with the default data settings scores its samples against the same held-out
images: half A (the reference), half B (real vs real) and half B through the shipped VAE (the
reconstruction floor). The file holds half A's Inception pool_3 features (the 200 rows its mean and
covariance are computed from: 1.6 MB, where the float64 covariance alone is 33 MB) and the two FIDs
that need no samples, so a run featurizes only the images it generated. It also says what it was
made from: digests of the held-out images and of the VAE's files, the images per class and the
Inception port's SHA-1. A run whose data, VAE or network differ recomputes everything instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from demo import ASSETS_DIR

log = logging.getLogger(__name__)

HELDOUT_FILE = ASSETS_DIR / "heldout_inception.npz"
SHIPPED_FIDS = ("fid_reconstruction", "fid_real_vs_real")


def _blake2b(*chunks: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class HeldOut:
    """The held-out sets of the demo's Inception FIDs: `per_class` images of every class."""

    real_a: np.ndarray  # the reference
    real_b: np.ndarray  # real vs real; through the VAE, the reconstruction floor
    per_class: int
    vae_dir: Path

    def identity(self, network_sha1: str) -> dict[str, Any]:
        """What shipped statistics must have been made from to stand for these sets."""
        vae_files = sorted(p for p in Path(self.vae_dir).iterdir() if p.is_file())
        return {
            "real_a_blake2b": _blake2b(self.real_a.tobytes()),
            "real_b_blake2b": _blake2b(self.real_b.tobytes()),
            "vae_blake2b": _blake2b(*(p.name.encode() + p.read_bytes() for p in vae_files)),
            "images_per_class": self.per_class,
            "network_sha1": network_sha1,
        }


def compute(held: HeldOut, net, fids) -> dict[str, Any]:
    """Half A's pool_3 features and the FIDs of half B and of its reconstructions against it;
    `fids(sets, net)` is `demo.inception.inception_fids`."""
    from demo.inception import reconstruct

    features: dict[str, np.ndarray] = {}
    values = fids(
        {
            "real_a": held.real_a,
            "reconstruction": reconstruct(held.real_b, held.vae_dir),
            "real_vs_real": held.real_b,
        },
        net,
        keep=features,
    )
    return {"real_a": features["real_a"], **{f"fid_{k}": v for k, v in values.items()}}


def save(path: Path, identity: dict[str, Any], computed: dict[str, Any]) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, identity=np.array(json.dumps(identity)), **computed)
    os.replace(tmp, path)
    return path


def load(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The shipped statistics when they were made from exactly these sets and network."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        if json.loads(str(f["identity"])) != identity:
            log.info("%s is of other held-out sets, VAE or network: recomputing them", path)
            return None
        return {"real_a": f["real_a"], **{k: float(f[k]) for k in SHIPPED_FIDS}}


def default_heldout(root: Path) -> HeldOut:
    """The default demo's held-out sets: its val split generated under `root`, then selected as a
    default run selects them (`demo.inception.heldout_sets`)."""
    from demo.config import NUM_CLASSES, DemoConfig, DemoDataConfig
    from demo.data import make_demo_data
    from demo.inception import heldout_sets

    cfg = DemoConfig()
    data = make_demo_data(
        DemoDataConfig(
            out=Path(root),
            train_per_class=1,
            val_per_class=cfg.val_per_class,
            image_size=cfg.image_size,
            seed=cfg.seed,
        )
    )
    asked = np.repeat(np.arange(NUM_CLASSES), cfg.samples_per_class)
    return heldout_sets(data, cfg.vae, cfg.fid_per_class, asked)


def main() -> None:
    """Remake HELDOUT_FILE from the default demo's held-out images, VAE and Inception port."""
    from demo.inception import inception_fids
    from evaluation.network import load_inception

    logging.basicConfig(level=logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        held = default_heldout(Path(tmp))
        net = load_inception()
        computed = compute(held, net, inception_fids)
    print(save(HELDOUT_FILE, held.identity(net.sha1), computed), computed["fid_real_vs_real"])


if __name__ == "__main__":
    main()
