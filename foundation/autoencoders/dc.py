"""AutoencoderDC: MIT HAN Lab's deep compression autoencoder (f32c32 and beyond), deterministic.

One latent per image (`encode(x).latent`), images in [-1, 1], spatial factor
2 ** (len(encoder_block_out_channels) - 1) (diffusers' `spatial_compression_ratio`), and a
`scaling_factor` in the config (0.41407 for the f32c32 models) that the trainer applies.
"""

from __future__ import annotations

from torch import Tensor

from foundation.autoencoders.base import DETERMINISTIC, Autoencoder


class DCAutoencoder(Autoencoder):
    """diffusers' AutoencoderDC."""

    family = "AutoencoderDC"
    posterior = DETERMINISTIC

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.config["encoder_block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.config["latent_channels"])

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.model.encode(x).latent.float(), None
