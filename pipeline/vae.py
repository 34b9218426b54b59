"""Encode uint8 crops into posterior latents with a diffusers AutoencoderKL (loaded by `foundation.vae`).

Stored latents are the raw posterior (before `scaling_factor` / `shift_factor`); the factors are
read from the VAE's config and recorded in the store, never typed in.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from foundation.vae import VaeConfig, downsampling, load_autoencoder, resolve_vae_id
from latent_store import VaeInfo

__all__ = ["VaeConfig", "encode_posterior", "encode_variants", "load_vae", "vae_info"]

log = logging.getLogger(__name__)


def load_vae(cfg: VaeConfig):
    """Load the AutoencoderKL in eval mode on cfg.device; returns (vae, VaeInfo)."""
    path, _ = resolve_vae_id(cfg.id)
    vae = load_autoencoder(cfg)
    return vae, vae_info(vae, path, cfg)


def vae_info(vae, vae_id: str, cfg: VaeConfig) -> VaeInfo:
    """Provenance and latent factors of a loaded VAE, from its config."""
    c = vae.config
    return VaeInfo(
        id=vae_id,
        revision=cfg.revision,
        cls=type(vae).__name__,
        scaling_factor=float(c.scaling_factor),
        shift_factor=None if c.get("shift_factor") is None else float(c.shift_factor),
        latent_channels=int(c.latent_channels),
        downsampling=downsampling(vae),
    )


def to_model_input(crops: torch.Tensor, vae) -> torch.Tensor:
    """uint8 (B, H, W, 3) crops to the VAE's input: (B, 3, H, W) in [-1, 1], its dtype."""
    x = crops.to(vae.device, non_blocking=True).permute(0, 3, 1, 2)
    x = x.to(vae.dtype).div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last)


def key_seed(key: str, variant: int) -> int:
    """A 63-bit seed from a sample's key and variant, the same on every rank and every run."""
    digest = hashlib.blake2b(f"{variant}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.inference_mode()
def encode_posterior(
    vae, crops: torch.Tensor, *, posterior: str, seeds: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode uint8 (B, H, W, 3) crops; returns float32 latents (B, C, h, w) and log std or None.

    posterior: "mean" (the posterior mean), "sample" (mean + std * noise, noise drawn on the CPU
    from `seeds`, one per crop, so it is the same on any device and split), or "moments" (the mean,
    plus the log std as the second output).
    """
    dist = vae.encode(to_model_input(crops, vae)).latent_dist
    mean = dist.mean.float()
    if posterior == "mean":
        return mean, None
    logstd = 0.5 * dist.logvar.float()  # diffusers clamps logvar to [-30, 20]
    if posterior == "moments":
        return mean, logstd
    assert seeds is not None and len(seeds) == len(mean), "sample mode needs one seed per crop"
    return mean + logstd.exp() * posterior_noise(seeds, mean.shape[1:]).to(mean.device), None


def posterior_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise (len(seeds), *shape), float32 on the CPU, one generator per seed."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def encode_variants(
    vae, crops: torch.Tensor, keys: list[str], *, flip: bool, posterior: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode uint8 (b, H, W, 3) crops and, with `flip`, their horizontal flips in the same pass.

    Returns float (b, V, C, h, w) latents and log std (posterior "moments") or None. `keys` (one
    per crop) seed the noise of posterior "sample", per key and variant.
    """
    crops = crops.to(vae.device, non_blocking=True)
    views = [crops, crops.flip(2)] if flip else [crops]  # (b, H, W, 3): flip W
    seeds = (
        [key_seed(k, v) for v in range(len(views)) for k in keys] if posterior == "sample" else None
    )
    mean, logstd = encode_posterior(vae, torch.cat(views), posterior=posterior, seeds=seeds)

    def by_variant(x):  # (V*b, C, h, w) -> (b, V, C, h, w)
        return torch.stack(x.split(len(keys)), dim=1)

    return by_variant(mean), None if logstd is None else by_variant(logstd)
