"""The options of the store's own commands, `inspect` and `validate` (importable without zarr).

latentdit inspect STORE [--json]
latentdit validate STORE [--json] [--decode-check N] [--seal]
"""

from __future__ import annotations

from dataclasses import dataclass

from foundation.config import option
from foundation.errors import ConfigError
from foundation.urls import check_options_apply, parse_storage_options

DEFAULT_MAX_CLIPPED = 1e-3  # clipped fraction of quantized values tolerated
# The floor of the mean PSNR (dB) from stored latents. sd-vae-ft-ema reconstructs COCO 2017 at
# 256 px with 23.8 +/- 3.9 dB per image (its model card); over 16 samples the mean spreads ~1 dB,
# so a sound store sits ~4 dB above 20, while a store decoded with the wrong VAE, scale or
# quantization lands near 10 dB. The demo's VAE: 26.4 dB held out.
DEFAULT_MIN_PSNR = 20.0


@dataclass(frozen=True, kw_only=True)
class InspectConfig:
    """Which store to describe."""

    store: str = option(argument=True)
    """A latent store (a folder or an fsspec URL), or a training run folder (its cost and FIDs)."""
    storage_options: str | None = None
    """JSON object of fsspec options for a store URL, e.g. '{"endpoint_url": "http://minio:9000"}'; default: the environment (AWS_*, AWS_ENDPOINT_URL), ~/.aws, fsspec config."""

    def __post_init__(self) -> None:
        check_options_apply(self.store, parse_storage_options(self.storage_options))


@dataclass(frozen=True, kw_only=True)
class ValidateConfig:
    """Which store to check, how strictly, and whether to decode some of it."""

    store: str = option(argument=True)
    """A latent store: a folder (Zarr v3 group) or an fsspec URL."""
    max_clipped: float = DEFAULT_MAX_CLIPPED
    """Largest tolerated fraction of quantized values that were clipped to 0 or 255."""
    decode_check: int | None = None
    """Also decode N stored latents and report PSNR against the re-cropped source images, from
    stored and from float latents (the gap is the quantization's cost)."""
    vae: str | None = None
    """VAE for --decode-check; default: the one recorded in the store."""
    min_psnr: float = DEFAULT_MIN_PSNR
    """--decode-check fails when the mean PSNR from stored latents is below this (dB;
    sd-vae-ft-ema averages 23.8 dB on COCO at 256 px, a broken store ~10 dB)."""
    seal: bool = option(False, flags=("--seal",))
    """Seal a store written before seals existed (readers refuse it unsealed): when every other
    check passes, write the seal over its metadata and keys; refused, with nothing written, when
    a check fails or the store is sealed already with other contents."""
    storage_options: str | None = None
    """JSON object of fsspec options for a store URL, e.g. '{"endpoint_url": "http://minio:9000"}'; default: the environment (AWS_*, AWS_ENDPOINT_URL), ~/.aws, fsspec config."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_clipped <= 1:
            raise ConfigError(f"--max-clipped {self.max_clipped}: give a fraction in [0, 1]")
        if self.decode_check is not None and self.decode_check < 1:
            raise ConfigError(f"--decode-check {self.decode_check}: give N >= 1 samples")
        check_options_apply(self.store, parse_storage_options(self.storage_options))
