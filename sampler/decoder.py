"""Check an autoencoder's decoder against a checkpoint, and turn a model's normalized latents into
8-bit images.

    decoder = LatentDecoder.load("stabilityai/sd-vae-ft-ema", meta)
    images = decoder(z)  # uint8 (B, H, W, 3)

Only the decoder is loaded (`foundation.autoencoders.loading.load_decoder`, any family): the
encoder's weights never reach memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from foundation.autoencoders.loading import load_decoder
from latent_store import VaeInfo
from sampler.errors import VaeMismatchError
from trainer.normalization import LatentNormalization

DECODE_CHUNK = 64
"""Images per decoder call. At 256 px the SD-VAE decoder holds (chunk, 128, 256, 256) activations:
64 images keep each under 2^31 elements and ~1 GiB in bf16, and still fill a GPU."""


def check_vae_fits(meta: Mapping[str, Any], ae, vae_id: str) -> None:
    """Refuse an autoencoder whose latents differ from the checkpoint's, naming both values.

    Compares the checkpoint's latent shape with what the model makes of images of that size, and
    each decoding fact the checkpoint recorded (family, channels, factors, image range, the model's
    normalization); a checkpoint made before a fact was recorded is not held to it."""
    recorded = dict(meta.get("vae", {}))
    wanted = tuple(meta["latent_shape"])
    norm = LatentNormalization.from_meta(dict(meta["normalization"]))
    checks = [
        ("latent channels", wanted[0], ae.latent_channels),
        ("normalization channels", norm.channels, ae.latent_channels),
    ] + [
        (name, recorded[name], theirs)
        for name, _, theirs in VaeInfo(**{**recorded, "id": vae_id}).mismatches(
            VaeInfo.of(ae, id=vae_id)
        )
        if name in recorded
    ]
    for what, ckpt, theirs in checks:
        if ckpt != theirs:
            raise VaeMismatchError(
                f"the checkpoint does not fit VAE {vae_id}: {what} {ckpt} (checkpoint, VAE "
                f"{recorded.get('id')}) vs {theirs} (VAE {vae_id}); pass the VAE it was trained "
                "with as --vae"
            )
    image_size = wanted[-1] * ae.spatial_factor
    if why := ae.misfit(family=ae.family, image_size=image_size, latent_shape=wanted):
        raise VaeMismatchError(
            f"the checkpoint does not fit VAE {vae_id}: its latents are {wanted} ({why}); pass "
            "the VAE it was trained with as --vae"
        )


class LatentDecoder:
    """Invert the checkpoint's latent normalization and decode with the autoencoder's decoder.

    `normalization`: meta["normalization"] of a loaded checkpoint (`load_for_inference`, or the
    meta the trainer hands its hooks), per-position values included.
    """

    def __init__(self, ae, normalization: Mapping[str, Any]) -> None:
        self.ae = ae
        self.normalization = LatentNormalization.from_meta(dict(normalization))
        self.downsampling = ae.spatial_factor

    @classmethod
    def load(
        cls,
        vae_id: str,
        meta: Mapping[str, Any],
        *,
        revision: str | None = None,
        device: str | torch.device = "cpu",
    ) -> LatentDecoder:
        """Load the decoder of `vae_id` and check it against the checkpoint's `meta`."""
        ae = load_decoder(vae_id, revision=revision, device=device)
        check_vae_fits(meta, ae, vae_id)
        return cls(ae, meta["normalization"])

    def __call__(self, z: Tensor, *, to_cpu: bool = True) -> Tensor:
        """uint8 images (B, H, W, 3) on the CPU (or the model's device) from normalized latents z.

        Decoded DECODE_CHUNK images at a time: the decoder's memory stays that of one chunk
        whatever the sampling batch (`--auto-batch` sizes the batch for the DiT).
        """
        images = [
            self.ae.decode_to_uint8(self.normalization.denormalize(part.float()), to_cpu=to_cpu)
            for part in z.split(DECODE_CHUNK)
        ]
        return images[0] if len(images) == 1 else torch.cat(images)
