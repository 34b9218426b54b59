"""Tiny randomly initialized autoencoders of every supported family, saved with `save_pretrained`.

    folder = TINY_AUTOENCODERS["rae-dinov2"].make(tmp / "rae")     # then --vae folder
    TINY_AUTOENCODERS["rae-dinov2"].image_size                      # 32: the crops it takes

Each is the real diffusers class, only narrow and shallow, so that the real loading path
(`from_pretrained`, the decoder-only loader, a pipeline folder's vae/) runs on it in tests. At its
`image_size` every one makes latents whose side fits the DiT presets' patch 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testkit.models import make_tiny_vae

WIDTH = 8  # channels of every convolutional block
RAE_TOKENS = 64  # an RAE's latent channels: the ViT's hidden size (diffusers' heads are 64 wide)


def _seeded(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch


def make_tiny_kl16(path: Path, *, seed: int = 0) -> Path:
    """An SD3/FLUX.1-style AutoencoderKL: 16 channels, f8, a shift_factor (0.125)."""
    from diffusers import AutoencoderKL

    make_tiny_vae(path, latent_channels=16, seed=seed)
    vae = AutoencoderKL.from_pretrained(path)
    vae.register_to_config(shift_factor=0.125)
    vae.save_pretrained(path)
    return path


def make_tiny_flux2(
    path: Path, *, latent_channels: int = 4, blocks: int = 3, seed: int = 0
) -> Path:
    """An AutoencoderKLFlux2 (f = 2**(blocks-1) * 2 after the 2x2 patchify, 4x the channels),
    with random BatchNorm running statistics, so that its normalization is not the identity."""
    from diffusers import AutoencoderKLFlux2

    torch = _seeded(seed)
    model = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(WIDTH,) * blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
    )
    with torch.no_grad():
        model.bn.running_mean.normal_(0.0, 0.5)
        model.bn.running_var.uniform_(0.25, 4.0)
    model.save_pretrained(path)
    return path


def make_tiny_dc(
    path: Path,
    *,
    latent_channels: int = 8,
    blocks: int = 4,
    scaling_factor: float = 0.4,
    seed: int = 0,
) -> Path:
    """An AutoencoderDC of residual blocks only (f = 2**(blocks-1)), deterministic."""
    from diffusers import AutoencoderDC

    _seeded(seed)
    AutoencoderDC(
        latent_channels=latent_channels,
        attention_head_dim=WIDTH,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=(WIDTH,) * blocks,
        decoder_block_out_channels=(WIDTH,) * blocks,
        encoder_layers_per_block=(1,) * blocks,
        decoder_layers_per_block=(1,) * blocks,
        encoder_qkv_multiscales=((),) * blocks,
        decoder_qkv_multiscales=((),) * blocks,
        scaling_factor=scaling_factor,
    ).save_pretrained(path)
    return path


def make_tiny_rae(path: Path, *, encoder: str = "dinov2", seed: int = 0) -> Path:
    """An AutoencoderRAE: a one-layer `encoder` ViT (hidden 64, patch 4) that sees 16-px inputs
    (the 32-px crops resized inside) as 4x4 tokens, a one-layer decoder back to 32 px, and random
    per-position latents_mean / latents_std (as RAE's released statistics are)."""
    from diffusers import AutoencoderRAE

    torch = _seeded(seed)
    grid = 4
    AutoencoderRAE(
        encoder_type=encoder,
        encoder_hidden_size=RAE_TOKENS,
        encoder_patch_size=4,
        encoder_num_hidden_layers=1,
        encoder_input_size=4 * grid,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
        patch_size=8,
        latents_mean=torch.randn(RAE_TOKENS, grid, grid).mul(0.3).tolist(),
        latents_std=torch.rand(RAE_TOKENS, grid, grid).add(0.5).tolist(),
    ).save_pretrained(path)
    return path


@dataclass(frozen=True)
class TinyAutoencoder:
    """A tiny model of one family: how to make it, and the crop side it takes in tests."""

    family: str
    make: Callable[[Path], Path]
    image_size: int = 32
    deterministic: bool = False


TINY_AUTOENCODERS = {
    "kl4": TinyAutoencoder("AutoencoderKL", make_tiny_vae),
    "kl16": TinyAutoencoder("AutoencoderKL", make_tiny_kl16),
    "flux2": TinyAutoencoder("AutoencoderKLFlux2", make_tiny_flux2),
    "dc": TinyAutoencoder("AutoencoderDC", make_tiny_dc, deterministic=True),
    "rae-dinov2": TinyAutoencoder("AutoencoderRAE", make_tiny_rae, deterministic=True),
    "rae-mae": TinyAutoencoder(
        "AutoencoderRAE", lambda p: make_tiny_rae(p, encoder="mae"), deterministic=True
    ),
}


def reference_latents(folder: Path, pixels):
    """What diffusers itself makes of uint8 images (B, 3, H, W) with the model in `folder`: its
    own `encode` (the posterior mode of a Gaussian one) on images in its range, and for
    AutoencoderKLFlux2 the FLUX.2 pipeline's own `_encode_vae_image` (patchify, BatchNorm
    statistics). Float32 (B, C, h, w); a test's independent reference for stored latents."""
    from types import SimpleNamespace

    import diffusers
    import torch

    family = diffusers.AutoencoderKL.load_config(folder)["_class_name"]
    model = getattr(diffusers, family).from_pretrained(folder).eval()
    x = pixels.float() / 255
    with torch.no_grad():
        if family == "AutoencoderRAE":  # images in [0, 1]
            return model.encode(x).latent
        x = x * 2 - 1
        if family == "AutoencoderDC":
            return model.encode(x).latent
        if family == "AutoencoderKLFlux2":
            from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

            pipe = SimpleNamespace(vae=model, _patchify_latents=Flux2Pipeline._patchify_latents)
            return Flux2Pipeline._encode_vae_image(pipe, x, generator=None)
        return model.encode(x).latent_dist.mode()
