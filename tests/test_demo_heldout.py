"""The demo's shipped held-out Inception statistics: made from the default demo's held-out images,
VAE and Inception port; used only for exactly those; giving the FIDs a run would compute itself
while featurizing only the samples."""

from __future__ import annotations

import numpy as np

import demo.inception
from demo import VAE_DIR, heldout
from demo.config import NUM_CLASSES, DemoConfig
from demo.data import load_split
from demo.inception import demo_inception, heldout_sets, inception_fids
from demo.verdict import split_halves
from evaluation.network import DEFAULT_SHA1, load_inception


def test_the_shipped_file_is_of_the_default_demos_heldout_sets(tmp_path):
    """Made by `python -m demo.heldout` from today's generator, the shipped VAE and the default
    Inception port: a default demo run uses it (a changed generator or VAE would not)."""
    cfg = DemoConfig()
    held = heldout.default_heldout(tmp_path / "data")
    shipped = heldout.load(heldout.HELDOUT_FILE, held.identity(DEFAULT_SHA1))
    assert shipped is not None, "remake it: python -m demo.heldout"
    assert shipped["real_a"].shape == (NUM_CLASSES * cfg.fid_per_class, 2048)
    assert shipped["fid_reconstruction"] > shipped["fid_real_vs_real"] > 0
    assert heldout.load(heldout.HELDOUT_FILE, held.identity("another network")) is None


def test_shipped_statistics_give_the_computed_fids_from_the_samples_alone(
    demo_data, tiny_inception, tmp_path, monkeypatch
):
    real, labels = load_split(demo_data, "val")
    _, (b, lb) = split_halves(real, labels)
    generated = np.flip(b, axis=2).copy()  # stand-in samples: mirrored real images
    run = dict(vae_dir=VAE_DIR, images_per_class=2, inception=tiny_inception)
    computed = demo_inception(demo_data, generated, lb, **run)  # nothing shipped for this net
    assert computed["heldout_statistics"] == "computed in this run"
    net = load_inception(tiny_inception)
    held = heldout_sets(demo_data, VAE_DIR, 2, lb)
    made = heldout.compute(held, net, inception_fids)
    monkeypatch.setattr(heldout, "HELDOUT_FILE", tmp_path / "heldout.npz")
    heldout.save(tmp_path / "heldout.npz", held.identity(net.sha1), made)
    featurized = []
    extract = demo.inception.extract_features
    monkeypatch.setattr(
        demo.inception,
        "extract_features",
        lambda images, *a, **k: featurized.append(images.count) or extract(images, *a, **k),
    )
    shipped = demo_inception(demo_data, generated, lb, **run)
    assert featurized == [2 * NUM_CLASSES]  # the samples alone
    assert shipped["heldout_statistics"] == str(tmp_path / "heldout.npz")
    for key in ("fid_generated", "fid_reconstruction", "fid_real_vs_real"):
        assert shipped[key] == computed[key], key
    fewer = heldout_sets(demo_data, VAE_DIR, 1, lb)  # other sets: the file does not stand for them
    assert heldout.load(tmp_path / "heldout.npz", fewer.identity(net.sha1)) is None
