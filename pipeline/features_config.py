"""How the encode job computes and stores a vision encoder's features (importable without torch).

    latentdit encode SOURCE --out STORE --features facebook/dinov2-base [--features-dtype fp16]
                     [--features-dims 64] [--features-grid 16]

The arrays, their layout and what the options mean: `pipeline.features` and docs/encode.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from foundation.errors import ConfigError

FEATURES, FEATURES_CLS = "features", "features_cls"  # the store's arrays: patch tokens, class token
STORED_DTYPES = {"uint8": "uint8", "fp16": "float16"}  # --features-dtype -> the stored dtype
DIT_PATCH = 2  # the default token grid is the latent grid a patch-2 DiT sees (REPA's SiT-XL/2)


@dataclass(frozen=True, kw_only=True)
class FeaturesConfig:
    """Which vision encoder, how its tokens are stored, and where it runs."""

    encoder: str
    """Hub id or folder of a transformers vision encoder (DINOv2, DINOv2 with registers, ViT,
    ViT-MAE without masking) or of a diffusers AutoencoderRAE (its encoder)."""
    revision: str | None = None
    """Hub revision of the encoder."""
    stored: str = "uint8"
    """How values are stored: uint8 (per-channel affine quantization) or fp16."""
    dims: int | None = None
    """Keep the first K principal components (PCA fitted on the calibration images); None: all."""
    grid: int | None = None
    """Token grid side; None: the latent side / DIT_PATCH."""
    dtype: str = "fp32"
    """Compute dtype of the encoder (the encode job's --dtype)."""
    device: str = "cpu"
    """Torch device to run on."""

    def __post_init__(self) -> None:
        if self.stored not in STORED_DTYPES:
            raise ConfigError(f"--features-dtype {self.stored!r}: use {' or '.join(STORED_DTYPES)}")
        for flag, value in (("--features-dims", self.dims), ("--features-grid", self.grid)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")

    @property
    def stored_dtype(self) -> str:
        """The dtype of the stored arrays (uint8 or float16)."""
        return STORED_DTYPES[self.stored]

    def grid_for(self, latent_side: int) -> int:
        """The token grid side for a store whose latents are `latent_side` on a side."""
        if self.grid is not None:
            return self.grid
        if latent_side < DIT_PATCH:
            raise ConfigError(
                f"--features: latents of {latent_side}x{latent_side} have no patch-{DIT_PATCH} "
                "grid; give the token grid with --features-grid"
            )
        return latent_side // DIT_PATCH
