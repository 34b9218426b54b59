"""Encoder features beside the latents (`encode --features`): the stored tokens against the
encoder run independently on the same crops, flips, fp16, PCA, features added to a finished
store, validate and inspect, and the refusals (one line each, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from conftest import BOMB_MAX_PIXELS, store_contents
from test_pipeline import _equal as _same
from test_repa_train import REPA, train_args
from test_trainer_runs import read_log, tiny_options
from typer.testing import CliRunner

from cli import app
from latent_store import LatentStore, validate_store
from latent_store.quantize import decode
from pipeline.encode import EncodeConfig, encode
from pipeline.features import ENCODER_KINDS, load_feature_encoder, resample_positions
from pipeline.features_config import FeaturesConfig
from pipeline.preprocess import PreprocessConfig, preprocess
from testkit import TINY_AUTOENCODERS
from testkit.vision_encoders import PATCH, REGISTERS, make_text_model, make_tiny_vision_encoder

SIZE = 32  # crops; the tiny VAE makes 4x4 latents of them: the default token grid is 2x2
# REPA's constants (timm's IMAGENET_DEFAULT_MEAN / _STD), typed here as the reference
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
JOB = dict(image_size=SIZE, shard_size=4, chunk_size=2, batch_size=2, calibration_samples=64)
JOB |= dict(workers=0, max_failures=6, max_pixels=BOMB_MAX_PIXELS, device="cpu")
runner = CliRunner()


@pytest.fixture(scope="session")
def encoders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision")
    kinds = ("dinov2", "dinov2_with_registers", "vit")
    return {k: make_tiny_vision_encoder(root / k, k, seed=i) for i, k in enumerate(kinds)}


def job(tree: Path, out: Path, vae: Path, **kw) -> EncodeConfig:
    return EncodeConfig(source=tree, out=str(out), vae=str(vae), **{**JOB, **kw})


def crops_of(store: Path, tree: Path) -> tuple[np.ndarray, np.ndarray]:
    """(written sample indices, their ADM crops uint8 (n, H, W, 3)), recropped from the source."""
    group = zarr.open_group(str(store), mode="r")
    index = np.flatnonzero(group["labels"][:] != -1)
    keys = group["keys"][:]
    pre = PreprocessConfig(image_size=SIZE, max_pixels=BOMB_MAX_PIXELS)
    crops = [preprocess((tree / keys[i]).read_bytes(), pre)[0] for i in index]
    return index, np.stack(crops)


def reference_tokens(folder: Path, crops: np.ndarray, grid: int, flip: bool = False):
    """The encoder run by transformers on REPA's preprocessing (x / 255, ImageNet mean/std, then
    bicubic to grid * patch): float32 patch tokens (n, D, T) and class tokens (n, D, 1)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    x = x.flip(3) if flip else x
    x = F.interpolate((x - MEAN) / STD, size=grid * PATCH, mode="bicubic")
    kwargs = {"interpolate_pos_encoding": True} if model.config.model_type == "vit" else {}
    with torch.no_grad():
        hidden = model(pixel_values=x, **kwargs).last_hidden_state
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    return hidden[:, prefix:].transpose(1, 2), hidden[:, :1].transpose(1, 2)


def stored(store: Path, name: str) -> torch.Tensor:
    """Array `name` of every sample, decoded (dequantized or cast) to float32."""
    spec = LatentStore(store).spec
    return decode(zarr.open_group(str(store), mode="r")[name][:], spec.array(name))


def steps(store: Path, name: str) -> torch.Tensor:
    """Half a quantization step per channel, shaped to broadcast against (n, C, T)."""
    q = LatentStore(store).spec.array(name).quant
    return torch.tensor(q.scale).view(1, -1, 1) / 2


# (kind, grid): DINOv2 at its trained grid (transformers' own interpolation of its positions is
# not REPA's), DINOv2 with registers resampled to 2x2 (transformers' antialiased interpolation is
# REPA's: the reference checks the resampling), ViT at its trained grid too
CASES = [("dinov2", 4), ("dinov2_with_registers", 2), ("vit", 4)]


@pytest.mark.parametrize(("kind", "grid"), CASES)
def test_stored_features_are_the_encoders_tokens_of_every_crop_and_flip(
    kind, grid, encoders, image_tree, tiny_vae_dir, tmp_path
):
    out = tmp_path / "s.zarr"
    extra = {"features_grid": grid} if grid != 2 else {}
    encode(job(image_tree, out, tiny_vae_dir, flip=True, features=str(encoders[kind]), **extra))
    index, crops = crops_of(out, image_tree)
    spec = LatentStore(out).spec
    assert spec.array("features").shape == (32, grid * grid)
    assert spec.array("features_cls").shape == (32, 1)
    for variant, flip in enumerate((False, True)):
        patch, cls = reference_tokens(encoders[kind], crops, grid, flip=flip)
        for name, want in (("features", patch), ("features_cls", cls)):
            got = stored(out, name)[index, variant]
            error = (got - want).abs() - steps(out, name)
            assert error.max() <= 1e-4, (name, variant, error.max())
    assert all(c.ok for c in validate_store(out)), validate_store(out)


def test_fp16_features_within_fp16_rounding(encoders, image_tree, tiny_vae_dir, tmp_path):
    out = tmp_path / "s.zarr"
    encoder = encoders["dinov2_with_registers"]
    encode(job(image_tree, out, tiny_vae_dir, features=str(encoder), features_dtype="fp16"))
    index, crops = crops_of(out, image_tree)
    patch, cls = reference_tokens(encoder, crops, grid=2)
    spec = LatentStore(out).spec
    for name, want in (("features", patch), ("features_cls", cls)):
        assert spec.array(name).dtype == "float16" and spec.array(name).quant is None
        got = stored(out, name)[index, 0]
        torch.testing.assert_close(got, want, rtol=2**-10, atol=1e-4)
    report = {c.name: c for c in validate_store(out)}
    assert all(c.ok for c in report.values())
    assert "features: float16; measured when written: rms" in report["quantization"].message


def test_repa_position_resampling_is_antialiased_bicubic(encoders):
    """Resampled once as REPA (timm: bicubic, antialiased), which is what transformers'
    DINOv2-with-registers interpolation computes per call, and not what its DINOv2's does."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(encoders["dinov2_with_registers"]).eval()
    x = torch.randn(2, 3, 2 * PATCH, 2 * PATCH)
    with torch.no_grad():
        theirs = model(pixel_values=x).last_hidden_state
        assert resample_positions(model, 2) and model.embeddings.position_embeddings.shape[1] == 5
        ours = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    plain = AutoModel.from_pretrained(encoders["dinov2"]).eval()
    with torch.no_grad():
        before = plain(pixel_values=x).last_hidden_state
        resample_positions(plain, 2)
        assert (plain(pixel_values=x).last_hidden_state - before).abs().max() > 1e-3
    assert ENCODER_KINDS["dinov2_with_registers"].registers == "num_register_tokens"
    assert model.config.num_register_tokens == REGISTERS


def test_pca_dims_store_the_projected_tokens(encoders, image_tree, tiny_vae_dir, tmp_path):
    out, encoder, k = tmp_path / "s.zarr", encoders["dinov2_with_registers"], 8
    encode(job(image_tree, out, tiny_vae_dir, features=str(encoder), features_dims=k, flip=True))
    spec = LatentStore(out).spec
    made = spec.array("features").made_by
    assert spec.array("features").shape == (k, 4) and spec.array("features_cls").shape == (k, 1)
    assert made["projection"]["dims"] == k and 0 < made["projection"]["explained_variance"] <= 1
    table = zarr.open_group(str(out), mode="r")["features_projection"][:]
    assert table.shape == (k + 1, 32) and table.dtype == np.float32
    mu, w = torch.from_numpy(table[0]), torch.from_numpy(table[1:])
    torch.testing.assert_close(w @ w.T, torch.eye(k), rtol=0, atol=1e-5)  # orthonormal axes
    index, crops = crops_of(out, image_tree)
    patch, cls = reference_tokens(encoder, crops, grid=2)
    for name, want in (("features", patch), ("features_cls", cls)):
        projected = torch.einsum("kd,ndt->nkt", w, want - mu[:, None])
        error = (stored(out, name)[index, 0] - projected).abs() - steps(out, name)
        assert error.max() <= 1e-4, name
    assert all(c.ok for c in validate_store(out))
    table[1, 0] += 1.0  # an edited projection is refused by validate
    zarr.open_group(str(out), mode="r+")["features_projection"][:] = table
    arrays = next(c for c in validate_store(out) if c.name == "arrays")
    assert not arrays.ok and "features_projection" in arrays.message


def test_features_added_to_a_finished_store_keep_its_latents(
    encoders, image_tree, tiny_vae_dir, tmp_path
):
    encoder = str(encoders["dinov2_with_registers"])
    plain, together = tmp_path / "plain.zarr", tmp_path / "together.zarr"
    encode(job(image_tree, plain, tiny_vae_dir, flip=True))
    before = store_contents(plain)
    encode(job(image_tree, plain, tiny_vae_dir, flip=True, features=encoder))
    after = store_contents(plain)
    for name in ("latents", "labels", "keys", "shard_records"):
        assert np.array_equal(before[name], after[name]), name
    spec = LatentStore(plain).spec
    assert [a.name for a in spec.added_arrays] == ["features", "features_cls"]
    encode(job(image_tree, together, tiny_vae_dir, flip=True, features=encoder))
    for name in ("features", "features_cls"):  # the same codes as made with the latents
        assert np.array_equal(after[name], store_contents(together)[name]), name
    assert all(c.ok for c in validate_store(plain))
    encode(job(image_tree, plain, tiny_vae_dir, flip=True, features=encoder))  # nothing left
    assert store_contents(plain).keys() == after.keys()


@pytest.mark.parametrize("dims", [None, 8], ids=["D", "pca"])
def test_repa_and_reg_train_on_the_encoded_features(
    dims, encoders, image_tree, tiny_vae_dir, tmp_path
):
    """The store as `train --repa-coeff --reg` reads it: the names and layout agreed on."""
    out = tmp_path / "s.zarr"
    encoder = str(encoders["dinov2_with_registers"])
    encode(job(image_tree, out, tiny_vae_dir, flip=True, features=encoder, features_dims=dims))
    options = {**tiny_options(out, tmp_path / "run", steps=2), **REPA, "reg": True}
    result = runner.invoke(app, train_args(options))
    assert result.exit_code == 0, result.output
    log = read_log(tmp_path / "run")
    assert len(log) == 2 and all({"loss_mse", "loss_proj", "loss_cls"} <= set(r) for r in log)


def test_validate_and_inspect_report_the_features(encoders, image_tree, tiny_vae_dir, tmp_path):
    out = tmp_path / "s.zarr"
    encode(job(image_tree, out, tiny_vae_dir, features=str(encoders["dinov2"])))
    result = runner.invoke(app, ["validate", str(out)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("PASS quantization"))
    assert "features: clipped" in line and "measured when written: rms" in line
    assert "features_cls: clipped" in line
    shown = runner.invoke(app, ["inspect", str(out)]).output
    assert f"made by {encoders['dinov2']} (Dinov2Model)" in shown
    described = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).output)
    features = next(a for a in described["arrays"] if a["name"] == "features")
    assert features["made_by"]["grid"] == [2, 2] and features["row_shape"] == [1, 32, 4]


def test_an_rae_encoder_gives_features_and_a_duplicate_is_refused(
    encoders, image_tree, tiny_vae_dir, tiny_autoencoders, tmp_path
):
    rae = tiny_autoencoders["rae-dinov2"]
    out = tmp_path / "sd.zarr"
    encode(job(image_tree, out, tiny_vae_dir, features=str(rae)))
    spec = LatentStore(out).spec
    assert spec.array("features").shape == (64, 16)  # the RAE's 4x4 grid of 64-wide tokens
    assert spec.array("features").made_by["class"].startswith("AutoencoderRAE.encoder")
    assert all(c.ok for c in validate_store(out))
    size = TINY_AUTOENCODERS["rae-dinov2"].image_size
    twice = tmp_path / "rae.zarr"
    with pytest.raises(Exception, match="the store's latents are these patch tokens"):
        encode(job(image_tree, twice, rae, image_size=size, features=str(rae)))
    assert not twice.exists()


@pytest.mark.parametrize("family", ["rae-dinov2", "rae-mae"])
def test_an_raes_encoder_gives_the_raes_own_tokens(family, tiny_autoencoders):
    """An AutoencoderRAE as --features: its patch tokens are the RAE's own, before its latent
    normalization (diffusers' resize, normalization and encoder forward), plus the class token."""
    from diffusers import AutoencoderRAE

    folder = tiny_autoencoders[family]
    encoder = load_feature_encoder(FeaturesConfig(encoder=str(folder)), latent_side=4)
    rae = AutoencoderRAE.from_pretrained(folder).eval()
    pixels = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    with torch.no_grad():
        patch, cls = encoder(pixels)
        x = rae._resize_and_normalize(pixels.float() / 255)
        extra = (rae.config.encoder_patch_size,) if family == "rae-mae" else ()
        theirs = rae._encoder_forward_fn(rae.encoder, x, *extra)
    torch.testing.assert_close(patch, theirs.transpose(1, 2), rtol=0, atol=1e-6)
    assert cls.shape == (3, 64, 1)


def _cli(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def test_bad_features_input_is_one_line_and_writes_nothing(
    encoders, image_tree, tiny_vae_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = make_text_model(tmp_path / "bert")
    out = tmp_path / "o.zarr"
    base = ["encode", image_tree, "--out", out, "--vae", tiny_vae_dir, "--image-size", SIZE]
    base += [
        "--workers",
        0,
        "--device",
        "cpu",
        "--max-failures",
        6,
        "--max-pixels",
        BOMB_MAX_PIXELS,
    ]
    dino = encoders["dinov2"]
    bad = {
        "a bert model (BertModel), not a vision encoder": ["--features", text],
        "a diffusers AutoencoderKL, not a vision encoder": ["--features", tiny_vae_dir],
        "no such folder": ["--features", "./no/such/encoder"],
        "HF_HUB_OFFLINE is set": ["--features", "no-org/no-encoder"],
        "--features-dims 64: ": ["--features", dino, "--features-dims", 64],
        "--features-dims sets how --features are made": ["--features-dims", 8],
        "--features-dtype 'bf16'": ["--features", dino, "--features-dtype", "bf16"],
    }
    for message, args in bad.items():
        code, output = _cli(*base, *args)
        assert code == 2 and message in output, (message, output)
        assert len(output.strip().splitlines()) == 1, output
        assert not out.exists(), message


def test_a_features_store_resumed_with_another_encoder_is_refused(
    encoders, image_tree, tiny_vae_dir, tmp_path
):
    out = tmp_path / "s.zarr"
    dino = str(encoders["dinov2"])
    encode(job(image_tree, out, tiny_vae_dir, features=dino))
    before = store_contents(out)
    other = make_tiny_vision_encoder(tmp_path / "other", "dinov2", seed=7)  # other weights
    refusals = {
        "holds features made by": dict(features=str(other)),
        "dims, dtype": dict(features=dino, features_dtype="fp16"),
        "grid": dict(features=dino, features_grid=4),
        "holds features made with the latents": {},
    }
    for message, options in refusals.items():
        with pytest.raises(Exception, match=message):
            encode(job(image_tree, out, tiny_vae_dir, **options))
        assert _same(store_contents(out), before), message


def test_features_need_a_complete_store(encoders, image_tree, tiny_vae_dir, tmp_path):
    out = tmp_path / "s.zarr"
    encode(job(image_tree, out, tiny_vae_dir))
    records = zarr.open_group(str(out), mode="r+")["shard_records"]
    records[1] = ""  # as a killed run leaves it
    before = store_contents(out)
    with pytest.raises(Exception, match=r"is not complete .* then run this one to add"):
        encode(job(image_tree, out, tiny_vae_dir, features=str(encoders["dinov2"])))
    assert _same(store_contents(out), before)
