"""The one autoencoder interface: every family's facts from its config, encode and decode as
diffusers' own, decoder-only loading, and the one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from foundation.autoencoders.families import FAMILIES
from foundation.autoencoders.loading import (
    VaeConfig,
    load_autoencoder,
    load_decoder,
    read_autoencoder,
)
from foundation.errors import ConfigError, VaeLoadError
from latent_store import VaeInfo
from testkit import TINY_AUTOENCODERS
from testkit.autoencoders import reference_latents

ROOT = Path(__file__).resolve().parents[1]
NAMES = list(TINY_AUTOENCODERS)


def kl(blocks: int, channels: int, scaling: float, **extra) -> dict:
    widths = [128, 256, 512, 512, 512][:blocks]
    return {
        "_class_name": "AutoencoderKL",
        "block_out_channels": widths,
        "latent_channels": channels,
        "scaling_factor": scaling,
        **extra,
    }


RAE_B = {
    "_class_name": "AutoencoderRAE",
    "encoder_type": "dinov2",
    "encoder_hidden_size": 768,
    "encoder_patch_size": 14,
    "encoder_input_size": 224,
    "patch_size": 16,
    "image_size": None,
    "latents_mean": [0.0],
    "latents_std": [1.0],
    "scaling_factor": 1.0,
}
FLUX2 = {
    "_class_name": "AutoencoderKLFlux2",
    "block_out_channels": [128, 256, 512, 512],
    "latent_channels": 32,
    "patch_size": [2, 2],
    "batch_norm_eps": 0.0001,
}
DC_F32 = {
    "_class_name": "AutoencoderDC",
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "latent_channels": 32,
    "scaling_factor": 0.41407,
}
VA_VAE = kl(5, 32, 1.0, latents_mean=[0.1] * 32, latents_std=[2.0] * 32)
# The official configs, reduced to what decides the latents (hub ids in docs/encode.md), and
# (shape at 256 px, posterior, scaling, shift, normalized_by); bytes per image = C * h * w.
OFFICIAL = {
    "sd-vae-ft-ema": (kl(4, 4, 0.18215), (4, 32, 32), "gaussian", 0.18215, None, None),
    "flux1-vae": (
        kl(4, 16, 0.3611, shift_factor=0.1159),
        (16, 32, 32),
        "gaussian",
        0.3611,
        0.1159,
        None,
    ),
    "va-vae-f16c32": (VA_VAE, (32, 16, 16), "gaussian", 1.0, None, None),
    "flux2-vae": (FLUX2, (128, 16, 16), "gaussian", 1.0, None, "bn_running_stats"),
    "dc-ae-f32c32": (DC_F32, (32, 8, 8), "deterministic", 0.41407, None, None),
    "rae-dinov2-b": (RAE_B, (768, 16, 16), "deterministic", 1.0, None, "latents_mean_std"),
}


def config_folder(root: Path, config: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.mark.parametrize("name", OFFICIAL)
def test_facts_come_from_the_official_configs(tmp_path, name):
    config, shape, posterior, scaling, shift, normalized = OFFICIAL[name]
    ae = read_autoencoder(str(config_folder(tmp_path / name, config)))
    assert ae.model is None and ae.family == config["_class_name"]
    assert ae.latent_shape(256) == shape and ae.posterior == posterior
    assert (ae.scaling_factor, ae.shift_factor, ae.normalized_by) == (scaling, shift, normalized)
    assert ae.image_range == ((0.0, 1.0) if "RAE" in ae.family else (-1.0, 1.0))
    assert 256 // ae.spatial_factor == shape[-1]
    # the table in docs/encode.md states these bytes per image
    assert f"{shape[0] * shape[1] * shape[2]:,}" in (ROOT / "docs" / "encode.md").read_text()


def test_per_channel_latents_mean_of_a_kl_config_is_recorded_for_the_trainer(tmp_path):
    config = VA_VAE
    ae = read_autoencoder(str(config_folder(tmp_path / "va", config)))
    info = VaeInfo.of(ae, id="va")
    assert info.latents_mean == (0.1,) * 32 and info.latents_std == (2.0,) * 32
    mean, std = info.channel_affine(32)  # z = (x - mean) * scaling / std, diffusers' convention
    assert mean == (0.1,) * 32 and std == (2.0,) * 32
    assert VaeInfo(id="sd", scaling_factor=0.5, shift_factor=0.25).channel_affine(2) == (
        (0.25, 0.25),
        (2.0, 2.0),
    )


def test_image_sizes_a_model_cannot_take_are_one_line(tmp_path):
    def facts(name: str, config: dict):
        return read_autoencoder(str(config_folder(tmp_path / name, config)))

    with pytest.raises(
        ConfigError, match=r"--image-size 100 is not a multiple of 8: .* use e.g. 96 or 104"
    ):
        facts("sd", kl(4, 4, 0.18215)).latent_shape(100)
    with pytest.raises(ConfigError, match="multiple of 16"):
        facts("flux2", FLUX2).latent_shape(264)
    rae = facts("rae", RAE_B)
    for size in (224, 512):  # its encoder sees 224 px, its decoder makes 256 px: only 256 fits
        with pytest.raises(ConfigError, match=r"takes 256-px crops .*16x16 tokens.*size 256"):
            rae.latent_shape(size)
    assert facts("i512", {**RAE_B, "encoder_input_size": 448}).latent_shape(512) == (768, 32, 32)


def test_an_unsupported_class_is_named_with_the_supported_ones(tmp_path):
    from diffusers import AutoencoderTiny

    folder = tmp_path / "taesd"
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
    ).save_pretrained(folder)
    for load in (read_autoencoder, load_decoder, lambda i: load_autoencoder(VaeConfig(id=i))):
        with pytest.raises(VaeLoadError) as e:
            load(str(folder))
        assert "a AutoencoderTiny, not a supported autoencoder; use one of" in str(e.value)
        assert all(family in str(e.value) for family in FAMILIES)
    flat = config_folder(tmp_path / "rae1d", {**RAE_B, "reshape_to_2d": False})
    with pytest.raises(VaeLoadError, match="reshape_to_2d is false"):
        read_autoencoder(str(flat))


def pixels(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size): smooth gradients plus noise, so every family sees structure."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    base = (
        (ramp.view(1, 1, 1, -1) + ramp.view(1, 1, -1, 1)) / 2 * torch.rand(n, 3, 1, 1, generator=g)
    )
    noisy = base * 200 + torch.rand(n, 3, size, size, generator=g) * 55
    return noisy.round().to(torch.uint8)


@pytest.fixture(scope="module")
def loaded(tiny_autoencoders) -> dict:
    return {n: load_autoencoder(VaeConfig(id=str(p))) for n, p in tiny_autoencoders.items()}


@pytest.mark.parametrize("name", NAMES)
def test_encode_is_what_diffusers_itself_returns(loaded, tiny_autoencoders, name):
    """The stored space is the model's own encode (FLUX.2: its pipeline's patchify + BatchNorm)."""
    ae, x = loaded[name], pixels()
    mean, logstd = ae.encode(ae.to_input(x))
    want = reference_latents(tiny_autoencoders[name], x)
    assert mean.dtype == torch.float32 and mean.shape == (3, *ae.latent_shape(32))
    torch.testing.assert_close(mean, want, rtol=1e-4, atol=1e-5)
    assert (logstd is None) == TINY_AUTOENCODERS[name].deterministic
    if logstd is not None:
        assert logstd.shape == mean.shape


@pytest.mark.parametrize("name", NAMES)
def test_decode_inverts_what_encode_applied(loaded, name):
    """decode(encode(x)) is the diffusers model's own round trip (its forward), for every family:
    the normalization applied inside encode is undone inside decode."""
    ae, x = loaded[name], pixels(seed=1)
    with torch.no_grad():
        want = ae.model(ae.to_input(x)).sample.float()
    torch.testing.assert_close(ae.decode(ae.encode(ae.to_input(x))[0]), want, rtol=1e-4, atol=1e-4)
    images = ae.decode_to_uint8(ae.encode(ae.to_input(x))[0])
    assert images.shape == (3, 32, 32, 3) and images.dtype == torch.uint8
    low, high = ae.image_range
    expected = ((want.clamp(low, high) - low) / (high - low) * 255).round().permute(0, 2, 3, 1)
    assert (images.int() - expected.int()).abs().max() <= 1


@pytest.mark.parametrize("name", NAMES)
def test_the_decoder_alone_never_reads_the_encoder(
    loaded, tiny_autoencoders, name, safetensors_reads
):
    read = safetensors_reads
    decoder = load_decoder(str(tiny_autoencoders[name]))
    skipped = tuple(f"{m}." for m in decoder.encoder_modules)
    assert read and not [k for k in read if k.startswith(skipped)]
    assert not decoder.has_encoder and loaded[name].has_encoder
    assert not any(t.is_meta for t in [*decoder.model.parameters(), *decoder.model.buffers()])
    z = loaded[name].encode(loaded[name].to_input(pixels(seed=2)))[0]
    torch.testing.assert_close(decoder.decode(z), loaded[name].decode(z), rtol=1e-4, atol=1e-4)
    assert VaeInfo.of(decoder, id="x") == VaeInfo.of(loaded[name], id="x")


@pytest.mark.parametrize("name", ["flux2", "dc", "rae-dinov2"])
def test_pipeline_folders_and_hub_repos_use_their_vae(
    tiny_autoencoders, tmp_path, name, monkeypatch
):
    import huggingface_hub.constants

    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_autoencoders[name], pipe / "vae")
    (pipe / "model_index.json").write_text(
        '{"_class_name": "SomePipeline", "vae": ["diffusers", "x"]}'
    )
    direct = VaeInfo.of(read_autoencoder(str(tiny_autoencoders[name])), id="x")
    assert VaeInfo.of(read_autoencoder(str(pipe)), id="x") == direct
    assert VaeInfo.of(load_decoder(str(pipe)), id="x") == direct
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-pipe"
    shutil.copytree(pipe, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert VaeInfo.of(load_decoder("acme/tiny-pipe"), id="x") == direct
    assert load_autoencoder(VaeConfig(id="acme/tiny-pipe")).has_encoder


def test_posterior_modes_of_a_deterministic_model_are_refused(loaded):
    for name in ("dc", "rae-dinov2"):
        loaded[name].check_posterior("mean")
        for mode in ("sample", "moments"):
            with pytest.raises(ConfigError, match=f"--posterior {mode}: .* is deterministic"):
                loaded[name].check_posterior(mode)
    loaded["flux2"].check_posterior("sample")


def test_a_rae_diffusers_cannot_build_is_refused_in_one_line(tmp_path):
    """diffusers 0.42.1 builds a SigLIP2 RAE through `SiglipVisionModel.vision_model`, which
    transformers 5 removed: whichever way it fails, one VaeLoadError line, never a traceback."""
    from safetensors.torch import save_file

    siglip = {
        **RAE_B,
        "encoder_type": "siglip2",
        "encoder_patch_size": 16,
        "encoder_input_size": 256,
    }
    folder = config_folder(tmp_path / "siglip2", siglip)
    save_file({}, folder / "diffusion_pytorch_model.safetensors")
    assert read_autoencoder(str(folder)).latent_shape(256) == (768, 16, 16)
    for load in (load_decoder, lambda i: load_autoencoder(VaeConfig(id=i))):
        with pytest.raises(VaeLoadError) as e:
            load(str(folder))
        assert len(str(e.value).splitlines()) == 1 and str(folder) in str(e.value)


@pytest.mark.parametrize("name", NAMES)
def test_every_family_runs_in_the_dtype_asked(tiny_autoencoders, loaded, name):
    """bf16 all through (diffusers leaves an RAE's transformers encoder in float32 otherwise);
    latents still come out float32, near the float32 model's."""
    ae = load_autoencoder(VaeConfig(id=str(tiny_autoencoders[name]), dtype="bf16"))
    assert {p.dtype for p in ae.model.parameters()} == {torch.bfloat16}
    x = pixels(seed=3)
    mean = ae.encode(ae.to_input(x))[0]
    want = loaded[name].encode(loaded[name].to_input(x))[0]
    assert mean.dtype == torch.float32
    assert (mean - want).abs().max() <= 0.05 * want.abs().max()
