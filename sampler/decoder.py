"""Check a VAE decoder against a checkpoint, and turn a model's normalized latents into 8-bit images.

    decoder = LatentDecoder.load("stabilityai/sd-vae-ft-ema", meta)
    images = decoder(z)  # uint8 (B, H, W, 3)

Only the decoder is loaded (`foundation.vae.load_vae_decoder`): the encoder's weights never reach
memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from foundation.vae import decode_latents, downsampling, load_vae_decoder
from sampler.errors import VaeMismatchError
from trainer.normalization import LatentNormalization

DECODE_CHUNK = 64
"""Images per decoder call. At 256 px the SD-VAE decoder holds (chunk, 128, 256, 256) activations:
64 images keep each under 2^31 elements and ~1 GiB in bf16, and still fill a GPU."""


def check_vae_fits(meta: Mapping[str, Any], vae, vae_id: str) -> None:
    """Refuse a VAE whose latents differ from the checkpoint's, naming both values."""
    recorded = meta.get("vae", {})
    norm = LatentNormalization.from_meta(dict(meta["normalization"]))
    checks = [
        ("latent channels", meta["latent_shape"][0], vae.config.latent_channels),
        ("normalization channels", norm.channels, vae.config.latent_channels),
    ] + [
        (key, recorded[key], mine)
        for key, mine in (
            ("scaling_factor", vae.config.scaling_factor),
            ("shift_factor", vae.config.shift_factor),
            ("downsampling", downsampling(vae)),
        )
        if key in recorded
    ]
    for what, ckpt, mine in checks:
        if not _same(ckpt, mine):
            raise VaeMismatchError(
                f"the checkpoint does not fit VAE {vae_id}: {what} {ckpt} (checkpoint, VAE "
                f"{recorded.get('id')}) vs {mine} (VAE {vae_id}); pass the VAE it was trained "
                "with as --vae"
            )


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b


class LatentDecoder:
    """Invert the checkpoint's latent normalization and decode with the VAE decoder.

    `normalization`: meta["normalization"] of a loaded checkpoint (`load_for_inference`, or the
    meta the trainer hands its hooks), per-position values included.
    """

    def __init__(self, vae, normalization: Mapping[str, Any]) -> None:
        self.vae = vae
        self.normalization = LatentNormalization.from_meta(dict(normalization))
        self.downsampling = downsampling(vae)

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
        vae = load_vae_decoder(vae_id, revision=revision, device=device)
        check_vae_fits(meta, vae, vae_id)
        return cls(vae, meta["normalization"])

    def __call__(self, z: Tensor, *, to_cpu: bool = True) -> Tensor:
        """uint8 images (B, H, W, 3) on the CPU (or the VAE's device) from normalized latents z.

        Decoded DECODE_CHUNK images at a time: the decoder's memory stays that of one chunk
        whatever the sampling batch (`--auto-batch` sizes the batch for the DiT).
        """
        images = [
            decode_latents(self.vae, self.normalization.denormalize(part.float()), to_cpu=to_cpu)
            for part in z.split(DECODE_CHUNK)
        ]
        return images[0] if len(images) == 1 else torch.cat(images)
