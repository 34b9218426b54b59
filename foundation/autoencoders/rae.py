"""AutoencoderRAE: a frozen representation encoder's patch tokens, decoded by a trained ViT.

Zheng et al. 2025, "Diffusion Transformers with Representation Autoencoders". The encoder (DINOv2
with registers, SigLIP2 or MAE, built with `transformers` from the config) takes images in [0, 1],
resizes them itself (bicubic, to `encoder_input_size`) and normalizes them with ImageNet's mean and
std; its tokens form a (hidden, g, g) latent with g = encoder_input_size // encoder_patch_size,
whatever the crop size. `encode` then normalizes them with the model's `latents_mean`/`latents_std`
(per channel or per position) and `scaling_factor`, and `decode` inverts that, so the stored space
is the normalized one. The ViT decoder makes images of `image_size` = patch_size * g pixels: that
is the one crop size a store of this model can hold (256 px for the released 224-px-input models,
768x16x16 latents with DINOv2-B).
"""

from __future__ import annotations

from torch import Tensor

from foundation.autoencoders.base import DETERMINISTIC, Autoencoder
from foundation.errors import ConfigError

ENCODERS = ("dinov2", "siglip2", "mae")


class RAEAutoencoder(Autoencoder):
    """diffusers' AutoencoderRAE (2-D latents: `reshape_to_2d`)."""

    family = "AutoencoderRAE"
    image_range = (0.0, 1.0)
    posterior = DETERMINISTIC

    def check_config(self) -> None:
        if self.config.get("encoder_type", "dinov2") not in ENCODERS:
            raise self.refuse(
                f"encoder_type {self.config.get('encoder_type')!r} is not one of {ENCODERS}"
            )
        if not self.config.get("reshape_to_2d", True):
            raise self.refuse(
                "reshape_to_2d is false (1-D token latents); latentdit stores (C, h, w)"
            )

    @property
    def grid(self) -> int:
        """Token grid side of the encoder's input."""
        return int(self.config["encoder_input_size"]) // int(self.config["encoder_patch_size"])

    @property
    def image_size(self) -> int:
        """The side of the images the decoder makes (and so of the crops it can encode)."""
        return int(self.config.get("image_size") or int(self.config["patch_size"]) * self.grid)

    @property
    def spatial_factor(self) -> int:
        return self.image_size // self.grid

    @property
    def latent_channels(self) -> int:
        return int(self.config["encoder_hidden_size"])

    @property
    def normalized_by(self) -> str | None:
        applied = []
        if (
            self.config.get("latents_mean") is not None
            or self.config.get("latents_std") is not None
        ):
            applied.append("latents_mean_std")
        if float(self.config.get("scaling_factor", 1.0)) != 1.0:
            applied.append(f"scaling_factor {float(self.config['scaling_factor'])}")
        return ", ".join(applied) or None

    def latent_side(self, image_size: int) -> int:
        if image_size != self.image_size:
            raise ConfigError(
                f"--image-size {image_size}: {self.family} {self.name} takes {self.image_size}-px "
                f"crops (its encoder sees {self.config['encoder_input_size']} px as "
                f"{self.grid}x{self.grid} tokens; its decoder makes {self.image_size} px); use "
                f"--image-size {self.image_size}"
            )
        return self.grid

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.model.encode(x).latent.float(), None

    def materialize(self, model) -> None:
        """The decoder's sin-cos position table, a non-persistent buffer, made as its __init__ does."""
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        decoder = model.decoder
        table = get_2d_sincos_pos_embed(
            decoder.decoder_hidden_size,
            int(decoder.num_patches**0.5),
            cls_token=True,
            extra_tokens=1,
            output_type="pt",
        )
        device = decoder.decoder_embed.weight.device
        decoder.register_buffer(
            "decoder_pos_embed", table.unsqueeze(0).float().to(device), persistent=False
        )
