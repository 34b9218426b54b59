"""AutoencoderKL: a Gaussian posterior over (C, H/f, W/f) latents, images in [-1, 1].

SD's VAE (f8c4, scaling_factor 0.18215), SD3 and FLUX.1 (f8c16 with a shift_factor), and the f16c32
VA-VAEs (whose configs may carry per-channel `latents_mean`/`latents_std`). Stored latents are the
raw posterior, before the factors, which the store records for the trainer.
"""

from __future__ import annotations

from torch import Tensor

from foundation.autoencoders.base import Autoencoder


class KLAutoencoder(Autoencoder):
    """diffusers' AutoencoderKL: f = 2 ** (len(block_out_channels) - 1)."""

    family = "AutoencoderKL"
    encoder_modules = ("encoder", "quant_conv")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.config["latent_channels"])

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        # diffusers' DiagonalGaussianDistribution: the moments of encoder + quant_conv, log
        # variance clamped to [-30, 20]
        posterior = self.model.encode(x).latent_dist
        return posterior.mean.float(), 0.5 * posterior.logvar.float()
