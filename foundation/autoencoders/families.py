"""The supported autoencoder families, by the diffusers class name a model's config holds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from foundation.autoencoders.base import Autoencoder
from foundation.autoencoders.dc import DCAutoencoder
from foundation.autoencoders.kl import KLAutoencoder
from foundation.autoencoders.kl_flux2 import Flux2Autoencoder
from foundation.autoencoders.rae import RAEAutoencoder
from foundation.errors import VaeLoadError

FAMILIES: dict[str, type[Autoencoder]] = {
    f.family: f for f in (KLAutoencoder, Flux2Autoencoder, DCAutoencoder, RAEAutoencoder)
}
DEFAULT_CLASS = "AutoencoderKL"  # configs saved before diffusers wrote `_class_name`


def autoencoder_for(config: Mapping[str, Any], name: str, model=None) -> Autoencoder:
    """The family of `config` (its `_class_name`) around `model`; one line for another class."""
    cls = config.get("_class_name", DEFAULT_CLASS)
    if cls not in FAMILIES:
        raise VaeLoadError(
            f"--vae {name}: a {cls}, not a supported autoencoder; use one of "
            f"{', '.join(FAMILIES)} (a model folder, a pipeline folder with vae/, or a hub id)"
        )
    return FAMILIES[cls](config, model, name=name)
