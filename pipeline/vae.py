"""Encode uint8 crops into stored-space latents with any autoencoder of `foundation.autoencoders`.

Stored latents are what the family's `encode` returns: the raw posterior of a KL or DC model
(before `scaling_factor` / `shift_factor`, which are read from its config and recorded in the
store, never typed in), or latents its model normalizes itself (FLUX.2's BatchNorm statistics,
RAE's latents_mean/latents_std), as `VaeInfo.normalized_by` records.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from foundation.autoencoders.loading import VaeConfig, load_autoencoder, resolve_vae_id
from latent_store import VaeInfo

__all__ = [
    "VaeConfig",
    "encodable_shape",
    "encode_posterior",
    "encode_variants",
    "load_vae",
    "posterior_latents",
]

log = logging.getLogger(__name__)


def load_vae(cfg: VaeConfig):
    """Load the whole autoencoder in eval mode on cfg.device; returns (Autoencoder, VaeInfo)."""
    ae = load_autoencoder(cfg)
    info = VaeInfo.of(ae, id=resolve_vae_id(cfg.id)[0], revision=cfg.revision)
    log.info("autoencoder %s: %s", info.id, ae.describe())
    return ae, info


def encodable_shape(ae, *, image_size: int, posterior: str) -> tuple[int, int, int]:
    """The stored latent shape (C, h, w) of `image_size` crops; one line (a LatentditError) for
    a size the model cannot take or a posterior mode it has nothing for."""
    ae.check_posterior(posterior)
    return ae.latent_shape(image_size)


def key_seed(key: str, variant: int) -> int:
    """A 63-bit seed from a sample's key and variant, the same on every rank and every run."""
    digest = hashlib.blake2b(f"{variant}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def posterior_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise (len(seeds), *shape), float32 on the CPU, one generator per seed."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def posterior_latents(
    mean: torch.Tensor, logstd: torch.Tensor | None, posterior: str, noise: torch.Tensor | None
) -> torch.Tensor:
    """The latents a posterior mode stores: the mean ("mean", "moments"), or mean + std * noise
    ("sample"; the noise drawn beforehand, in the stored space)."""
    if posterior != "sample":
        return mean
    assert logstd is not None and noise is not None, "sample needs a Gaussian posterior and noise"
    return mean + logstd.exp() * noise


@torch.inference_mode()
def encode_posterior(
    ae, crops: torch.Tensor, *, posterior: str, seeds: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode uint8 (B, H, W, 3) crops; returns float32 latents (B, C, h, w) and log std or None.

    posterior: "mean" (the posterior mean), "sample" (mean + std * noise, noise drawn on the CPU
    from `seeds`, one per crop, so it is the same on any device and split), or "moments" (the mean,
    plus the log std as the second output).
    """
    mean, logstd = ae.encode(ae.to_input(crops.to(ae.device).permute(0, 3, 1, 2)))
    noise = None
    if posterior == "sample":
        assert seeds is not None and len(seeds) == len(mean), "sample mode needs one seed per crop"
        noise = posterior_noise(seeds, mean.shape[1:]).to(mean.device)
    latents = posterior_latents(mean, logstd, posterior, noise)
    return latents, logstd if posterior == "moments" else None


def encode_variants(
    ae, crops: torch.Tensor, keys: list[str], *, flip: bool, posterior: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode uint8 (b, H, W, 3) crops and, with `flip`, their horizontal flips in the same pass.

    Returns float (b, V, C, h, w) latents and log std (posterior "moments") or None. `keys` (one
    per crop) seed the noise of posterior "sample", per key and variant.
    """
    crops = crops.to(ae.device, non_blocking=True)
    views = [crops, crops.flip(2)] if flip else [crops]  # (b, H, W, 3): flip W
    seeds = (
        [key_seed(k, v) for v in range(len(views)) for k in keys] if posterior == "sample" else None
    )
    mean, logstd = encode_posterior(ae, torch.cat(views), posterior=posterior, seeds=seeds)

    def by_variant(x):  # (V*b, C, h, w) -> (b, V, C, h, w)
        return torch.stack(x.split(len(keys)), dim=1)

    return by_variant(mean), None if logstd is None else by_variant(logstd)
