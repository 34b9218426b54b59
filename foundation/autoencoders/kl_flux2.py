"""AutoencoderKLFlux2: FLUX.2's VAE, 32 channels at f8, patchified 2x2 and BatchNorm-normalized.

The FLUX.2 pipelines (diffusers' pipeline_flux2.py, `_encode_vae_image` and the decode at the end
of `__call__`) take the posterior mean, patchify it 2x2 into 128 channels at f16
(`_patchify_latents`), then normalize each channel with the VAE's BatchNorm running statistics:
(z - running_mean) / sqrt(running_var + batch_norm_eps). Decoding inverts both. That is the stored
space here too: 128x16x16 per 256-px image, the model's own normalization already applied (no
scaling or shift factor is left for the trainer). The log std is patchified and normalized alike,
so a posterior sample drawn in the stored space is one of the raw posterior.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from foundation.autoencoders.kl import KLAutoencoder

PATCHIFY = "b c (h p) (w q) -> b (c p q) h w"  # channel-major, as pipeline_flux2's view/permute
UNPATCHIFY = "b (c p q) h w -> b c (h p) (w q)"


class Flux2Autoencoder(KLAutoencoder):
    """diffusers' AutoencoderKLFlux2 with the FLUX.2 pipelines' latent convention."""

    family = "AutoencoderKLFlux2"

    def check_config(self) -> None:
        p, q = self.patch
        if p != q:
            raise self.refuse(f"patch_size {[p, q]} is not square; latentdit stores square crops")

    @property
    def patch(self) -> tuple[int, int]:
        p, q = self.config.get("patch_size", (2, 2))
        return int(p), int(q)

    @property
    def spatial_factor(self) -> int:
        return super().spatial_factor * self.patch[0]

    @property
    def latent_channels(self) -> int:
        return super().latent_channels * math.prod(self.patch)

    @property
    def normalized_by(self) -> str | None:
        return "bn_running_stats"

    def _statistics(self) -> tuple[Tensor, Tensor]:
        """The BatchNorm's running mean and std, float32 (1, C, 1, 1)."""
        bn = self.model.bn
        std = torch.sqrt(bn.running_var.float() + float(self.config["batch_norm_eps"]))
        return bn.running_mean.float().view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        mean, logstd = super().encode(x)
        p, q = self.patch
        center, scale = self._statistics()
        mean = (rearrange(mean, PATCHIFY, p=p, q=q) - center) / scale
        return mean, rearrange(logstd, PATCHIFY, p=p, q=q) - scale.log()

    def decode(self, z: Tensor) -> Tensor:
        p, q = self.patch
        center, scale = self._statistics()
        return super().decode(rearrange(z.float() * scale + center, UNPATCHIFY, p=p, q=q))
