"""The embedded demo: generated data, the shipped VAE and classifier, the Fréchet distance, the
verdict, and a shortened demo through the real CLI stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from demo import CLASSIFIER_DIR, VAE_DIR
from demo.classifier import Classifier, load_classifier
from demo.data import (
    CLASSES,
    SYNSET_FILE,
    DemoDataConfig,
    as_tensor,
    load_split,
    make_demo_data,
)
from demo.frechet import frechet_distance
from demo.verdict import (
    REPORT_FILE,
    VerdictConfig,
    format_report,
    judge,
    split_halves,
    verdict,
)
from foundation.errors import ConfigError

# --- data ----------------------------------------------------------------------------------------


def test_data_is_imagenet_layout_and_deterministic(tmp_path, demo_data):
    again = make_demo_data(DemoDataConfig(out=tmp_path / "a", train_per_class=2, val_per_class=4))
    other = make_demo_data(
        DemoDataConfig(out=tmp_path / "b", train_per_class=2, val_per_class=4, seed=1)
    )
    files = sorted(p.relative_to(demo_data) for p in demo_data.rglob("*.JPEG"))
    assert len(files) == len(CLASSES) * (2 + 4)
    assert {p.parts[:2] for p in files} == {
        (split, c.id) for split in ("train", "val") for c in CLASSES
    }
    assert all((again / p).read_bytes() == (demo_data / p).read_bytes() for p in files)
    assert all((other / p).read_bytes() != (demo_data / p).read_bytes() for p in files)
    lines = (demo_data / SYNSET_FILE).read_text().splitlines()
    assert lines == [f"{c.id} {c.name}" for c in CLASSES]
    assert [c.id for c in CLASSES] == sorted(c.id for c in CLASSES)  # index = sorted position


def test_load_split_returns_images_and_labels(demo_data):
    images, labels = load_split(demo_data, "train")
    assert images.shape == (len(CLASSES) * 2, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [c for c in range(len(CLASSES)) for _ in range(2)]
    x = as_tensor(images)
    assert x.shape == (len(images), 3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_data_config_rejects_bad_sizes(tmp_path):
    with pytest.raises(ConfigError, match="image_size"):
        DemoDataConfig(out=tmp_path, image_size=4)
    with pytest.raises(ConfigError, match="val_per_class"):
        DemoDataConfig(out=tmp_path, val_per_class=1)


# --- Fréchet distance ----------------------------------------------------------------------------


def test_frechet_distance_zero_for_same_set_and_grows_with_shift():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 8)) @ rng.standard_normal((8, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shifts = [frechet_distance(x, x + d) for d in (0.5, 1.0, 2.0)]
    # equal covariances: FD is exactly the squared distance of the means, 8 * d^2
    assert shifts == pytest.approx([8 * 0.25, 8 * 1.0, 8 * 4.0], rel=1e-6)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((20000, 2)) * [1.0, 2.0]
    b = rng.standard_normal((20000, 2)) * [3.0, 0.5] + [1.0, 0.0]
    mu_a, mu_b = a.mean(0), b.mean(0)
    sd_a, sd_b = a.std(0, ddof=1), b.std(0, ddof=1)
    # diagonal covariances: sum of (mu difference)^2 + (sigma difference)^2 per dimension
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((sd_a - sd_b) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-3)


def test_frechet_distance_rejects_a_single_sample():
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))


# --- shipped assets ------------------------------------------------------------------------------


def test_shipped_vae_loads_through_from_pretrained_and_reconstructs(demo_data):
    from diffusers import AutoencoderKL

    from demo.train_vae import reconstruction_psnr

    vae = AutoencoderKL.from_pretrained(VAE_DIR).eval()
    recipe = json.loads((VAE_DIR / "training.json").read_text())
    assert vae.config.latent_channels == 4
    assert vae.config.scaling_factor == pytest.approx(1 / recipe["metrics"]["latent_std"])
    assert sum(p.numel() for p in vae.parameters()) * 4 < 5e6  # "a few MB at most"
    images, _ = load_split(demo_data, "val")
    x = as_tensor(images)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    assert z.shape == (len(x), 4, 8, 8)
    assert reconstruction_psnr(vae, x) > 20.0


def test_shipped_classifier_names_fresh_demo_images(demo_data):
    clf = load_classifier()
    images, labels = load_split(demo_data, "val")
    assert (clf.classify(images) == labels).mean() >= 0.9
    feats = clf.features(images)
    assert feats.shape == (len(images), clf.config["feature_dim"])
    assert json.loads((CLASSIFIER_DIR / "config.json").read_text())["metrics"]["val_accuracy"] > 0.9


def test_classifier_save_load_round_trip(tmp_path, demo_data):
    torch.manual_seed(0)
    clf = Classifier(num_classes=len(CLASSES), channels=(4, 8), feature_dim=6)
    clf.save(tmp_path / "clf")
    back = load_classifier(tmp_path / "clf")
    images, _ = load_split(demo_data, "train")
    np.testing.assert_array_equal(clf.features(images), back.features(images))
    with pytest.raises(ValueError, match="32x32"):
        clf.classify(images[:, :16, :16])
    with pytest.raises(FileNotFoundError, match="demo-tools train-classifier"):
        load_classifier(tmp_path / "missing")


# --- verdict -------------------------------------------------------------------------------------


def test_split_halves_are_disjoint_and_balanced():
    labels = np.repeat(np.arange(3), 4)
    images = np.arange(12)
    (a, la), (b, lb) = split_halves(images, labels)
    assert set(a.tolist()).isdisjoint(b.tolist()) and len(a) + len(b) == 12
    assert np.bincount(la).tolist() == np.bincount(lb).tolist() == [2, 2, 2]


def test_verdict_judges_real_images_as_right_and_wrong_labels_as_wrong(tmp_path, demo_data):
    images, labels = load_split(demo_data, "val")
    report = verdict(VerdictConfig(data=demo_data, out=tmp_path), images, labels)
    assert report["accuracy"] >= 0.9 and report["goal_met"]
    assert len(report["per_class"]) == len(CLASSES)
    assert json.loads((tmp_path / REPORT_FILE).read_text()) == report
    wrong = judge(load_classifier(), images, (labels + 1) % len(CLASSES), images, labels)
    assert wrong["accuracy"] <= 0.1 and not wrong["goal_met"]
    # noise is far from real images; the real halves are close to each other
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    far = judge(load_classifier(), noise, labels, images, labels)
    assert far["fd_generated_vs_real"] > 10 * far["fd_real_vs_real"]


# --- the demo, shortened: every real stage on a handful of images ------------------------------


@pytest.mark.slow
def test_quick_demo_makes_every_artifact(tmp_path):
    from PIL import Image

    from demo.run import GRID_COLUMNS, DemoConfig, DemoError, run_demo
    from latent_store import validate_store
    from trainer.checkpoint import load_for_inference

    cfg = DemoConfig.quick(tmp_path / "demo_out")
    shown = []
    report = run_demo(cfg, echo=shown.append)
    out = cfg.out
    steps = [line.split("] $ ")[1].split()[:2] for line in shown if "] $ " in line]
    assert steps == [
        ["latentdit", "demo-tools"],
        ["latentdit", "encode"],
        ["latentdit", "validate"],
        ["latentdit", "train"],
        ["latentdit", "sample"],
    ]
    assert all(c.ok for c in validate_store(out / "store.zarr"))
    model, meta = load_for_inference(out / "run")
    assert model.config["hidden_size"] == cfg.hidden_size
    assert model.config["num_classes"] == len(CLASSES) and len(meta["classes"]) == len(CLASSES)
    with Image.open(out / "grid.png") as grid:  # 10 x 10 tiles of 32 px, 2 px between tiles
        side = GRID_COLUMNS * 32 + (GRID_COLUMNS - 1) * 2
        assert grid.size == (side, side)
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved == report
    for key in ("accuracy", "per_class", "fd_generated_vs_real", "fd_real_vs_real", "seconds"):
        assert key in report
    assert report["samples_generated"] == len(CLASSES) * cfg.samples_per_class
    assert 0 <= report["accuracy"] <= 1 and report["fd_real_vs_real"] >= 0
    assert set(report["seconds"]) == {
        "data",
        "encode",
        "validate",
        "train",
        "sample",
        "verdict",
        "inception",
        "total",
    }
    assert str(out / "grid.png") in shown[-1] and str(out / REPORT_FILE) in shown[-1]
    with pytest.raises(DemoError, match="earlier demo"):
        run_demo(cfg, echo=shown.append)


def test_inception_report_of_the_demo(demo_data, tiny_inception):
    """The demo's Inception FIDs (here with a tiny stand-in network): samples, VAE floor, real."""
    from demo.inception import demo_inception

    real, labels = load_split(demo_data, "val")
    (a, la), (b, lb) = split_halves(real, labels)
    generated = np.flip(b, axis=2).copy()  # stand-in samples: mirrored real images
    r = demo_inception(demo_data, generated, lb, vae_dir=VAE_DIR, images_per_class=2,
                       inception=tiny_inception)  # fmt: skip
    assert r["images_per_set"] == 2 * len(CLASSES)
    assert all(r[k] > 0 for k in ("fid_generated", "fid_reconstruction", "fid_real_vs_real"))
    text = format_report({**judge(load_classifier(), b, lb, a, la), "inception": r})
    assert "VAE reconstruction floor" in text


def test_demo_command_refuses_an_earlier_demo_and_bad_options(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    (tmp_path / REPORT_FILE).write_text("{}")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "holds an earlier demo: remove it or pass another --out" in result.output
    assert CliRunner().invoke(app, ["demo", "--train-steps", "0"]).exit_code == 2
