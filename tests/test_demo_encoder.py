"""The demo's image encoder (REPA's features on the demo): the shipped asset through the real
`--features` path, its tokens telling the demo's classes apart, and its training command."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

from cli import app
from demo import ENCODER_DIR, VAE_DIR
from demo.data import CLASSES, load_split
from latent_store import LatentStore, validate_store
from pipeline.encode import EncodeConfig, encode
from pipeline.feature_graph import encode_views
from pipeline.features import load_feature_encoder
from pipeline.features_config import FeaturesConfig

DEMO_LATENT_SIDE = 8  # the demo VAE's latents of 32-px images: a 4x4 grid for DiT-S/2


def test_shipped_encoder_is_small_and_recorded():
    files = {p.name: p.stat().st_size for p in ENCODER_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "training.json"} <= set(files)
    assert sum(files.values()) < 2e6
    recipe = json.loads((ENCODER_DIR / "training.json").read_text())
    assert recipe["config"]["data_seed"] not in (0, 1, 2)  # the demo's, the VAE's, the verdict's
    assert recipe["metrics"]["val_accuracy_cls"] >= 0.9


def test_shipped_encoder_tokens_tell_the_classes_apart(demo_data):
    """Nearest class mean on the class tokens, and on the mean patch token, of fresh demo images
    (the demo's own seed, which the encoder never saw): both name the class."""
    encoder = load_feature_encoder(
        FeaturesConfig(encoder=str(ENCODER_DIR)), latent_side=DEMO_LATENT_SIDE
    )
    assert (encoder.grid, encoder.hidden) == (4, 64)
    images, labels = load_split(demo_data, "val")
    patch, cls = encode_views(encoder, torch.from_numpy(images), flip=False)
    for tokens in (cls[:, 0, :, 0], patch[:, 0].mean(-1)):
        x = torch.nn.functional.normalize(tokens, dim=1).numpy()
        a, b = np.arange(len(x)) % 2 == 0, np.arange(len(x)) % 2 == 1  # means on a, judged on b
        means = np.stack([x[a & (labels == c)].mean(0) for c in range(len(CLASSES))])
        named = (x[b] @ means.T).argmax(1)
        assert (named == labels[b]).mean() >= 0.9


def test_the_demo_store_gets_the_encoders_features(demo_data, tmp_path):
    out = tmp_path / "demo.zarr"
    cfg = EncodeConfig(
        source=demo_data / "train",
        out=str(out),
        vae=str(VAE_DIR),
        image_size=32,
        workers=0,
        device="cpu",
        flip=True,
        features=str(ENCODER_DIR),
    )
    encode(cfg)
    spec = LatentStore(out).spec
    assert spec.array("features").shape == (64, 16) and spec.array("features_cls").shape == (64, 1)
    assert all(c.ok for c in validate_store(out))


def test_train_encoder_command_saves_a_loadable_encoder(tmp_path):
    out = tmp_path / "enc"
    args = ["demo-tools", "train-encoder", "--out", str(out), "--steps", "3", "--batch-size", "8"]
    args += ["--train-per-class", "2", "--val-per-class", "2", "--depth", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "training.json").read_text())["metrics"]
    assert {"val_accuracy_cls", "val_accuracy_patch", "val_pixel_mse"} <= set(metrics)
    encoder = load_feature_encoder(FeaturesConfig(encoder=str(out)), latent_side=8)
    assert encoder.facts["class"] == "Dinov2Model" and encoder.tokens == 16
