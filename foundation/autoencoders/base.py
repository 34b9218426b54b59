"""The autoencoder interface: what a diffusers autoencoder says about its latents, and its codec.

An `Autoencoder` wraps one diffusers model (or only its config, for the facts). Latents are always
in the *stored space*: what `encode` returns and `decode` takes, the space the store holds and the
trainer normalizes. For most families that is the model's own latent (before `scaling_factor` and
`shift_factor`, which the trainer applies); a family whose model normalizes its latents itself
(RAE's `latents_mean`/`latents_std`, the FLUX.2 pipelines' BatchNorm statistics) applies that
normalization inside `encode` and inverts it inside `decode`, and says so in `normalized_by`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from foundation.errors import ConfigError, VaeLoadError

GAUSSIAN = "gaussian"  # a diagonal Gaussian posterior: a mean and a log std per value
DETERMINISTIC = "deterministic"  # one latent per image: nothing to sample
PIXEL_MAX = 255.0


class Autoencoder:
    """A diffusers autoencoder behind latentdit's one interface (see the module docstring).

    Subclasses set the class facts below and read the rest from `config`; `model` is the loaded
    diffusers model, or None when only the facts are needed (`loading.read_autoencoder`).
    """

    family: ClassVar[str]
    """The diffusers class name, as the config's `_class_name` holds it."""
    image_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)
    """The pixel values the encoder takes and the decoder returns (black, white)."""
    posterior: ClassVar[str] = GAUSSIAN
    """GAUSSIAN or DETERMINISTIC."""
    encoder_modules: ClassVar[tuple[str, ...]] = ("encoder",)
    """The model's submodules a decoder-only load leaves out (their weights are never read)."""

    def __init__(self, config: Mapping[str, Any], model=None, *, name: str = "") -> None:
        self.config = dict(config)
        self.model = model
        self.name = name or self.family
        self.check_config()

    def check_config(self) -> None:
        """Refuse, in one line, a config this family cannot use (VaeLoadError)."""

    def refuse(self, what: str) -> VaeLoadError:
        """A VaeLoadError naming this model: `--vae NAME (FAMILY): what`."""
        return VaeLoadError(f"--vae {self.name} ({self.family}): {what}")

    # --- facts, from the config --------------------------------------------------------------

    @property
    def spatial_factor(self) -> int:
        """Image pixels per latent position along each side (8 for SD's VAE)."""
        raise NotImplementedError

    @property
    def latent_channels(self) -> int:
        """Channels of a stored latent."""
        raise NotImplementedError

    @property
    def scaling_factor(self) -> float:
        """The factor a consumer multiplies stored latents by (after `shift_factor`); 1.0 when
        the model normalizes its latents itself (`normalized_by`)."""
        return 1.0 if self.normalized_by else float(self.config.get("scaling_factor", 1.0))

    @property
    def shift_factor(self) -> float | None:
        """The value a consumer subtracts from stored latents first; None: none."""
        shift = None if self.normalized_by else self.config.get("shift_factor")
        return None if shift is None else float(shift)

    @property
    def latents_mean(self) -> tuple[float, ...] | None:
        """A per-channel mean the config carries for consumers to normalize with; None: none."""
        return None if self.normalized_by else self._per_channel("latents_mean")

    @property
    def latents_std(self) -> tuple[float, ...] | None:
        """The per-channel std that goes with `latents_mean`."""
        return None if self.normalized_by else self._per_channel("latents_std")

    def _per_channel(self, key: str) -> tuple[float, ...] | None:
        """config[key] when it holds one number per latent channel, else None."""
        values = self.config.get(key)
        if not isinstance(values, list | tuple) or len(values) != self.latent_channels:
            return None
        if not all(isinstance(v, int | float) for v in values):
            return None
        return tuple(float(v) for v in values)

    @property
    def normalized_by(self) -> str | None:
        """The model's own latent normalization that `encode` applies and `decode` inverts."""
        return None

    def latent_side(self, image_size: int) -> int:
        """Latent positions per side of a square `image_size` crop; one line for a size it cannot take."""
        factor = self.spatial_factor
        if image_size < factor or image_size % factor:
            near = sorted(
                {max(factor, image_size // factor * factor), -(-image_size // factor) * factor}
            )
            raise ConfigError(
                f"--image-size {image_size} is not a multiple of {factor}: {self.family} "
                f"{self.name} makes one latent per {factor}x{factor} pixels; use e.g. "
                f"{' or '.join(map(str, near))}"
            )
        return image_size // factor

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, h, w) of the stored latent of a square `image_size` crop."""
        side = self.latent_side(image_size)
        return (self.latent_channels, side, side)

    def misfit(self, *, family: str, image_size: int, latent_shape) -> str | None:
        """Why this model does not make `latent_shape` latents of `image_size`-px crops, as the
        `family` model that made them did; None when it does."""
        if family != self.family:
            return f"a {self.family}, not a {family}"
        try:
            made = self.latent_shape(image_size)
        except ConfigError as e:
            return str(e)
        if made != tuple(latent_shape):
            return f"latents {made}, not {tuple(latent_shape)}, of {image_size}-px images"
        return None

    def check_posterior(self, posterior: str) -> None:
        """Refuse a posterior mode ("mean", "sample", "moments") this model has nothing for."""
        if posterior != "mean" and self.posterior == DETERMINISTIC:
            raise ConfigError(
                f"--posterior {posterior}: {self.family} {self.name} is deterministic (one latent "
                "per image, no posterior to sample or to take moments of); use --posterior mean"
            )

    # --- the model ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def has_encoder(self) -> bool:
        """False for a decoder-only load."""
        return all(getattr(self.model, name, None) is not None for name in self.encoder_modules)

    def to_input(self, pixels: Tensor) -> Tensor:
        """uint8 images (B, 3, H, W) to the encoder's input: the image range, the model's dtype,
        channels_last. For [-1, 1] this is x / 127.5 - 1, exactly."""
        low, high = self.image_range
        x = pixels.to(self.dtype).div_(PIXEL_MAX / (high - low))
        if low:
            x = x.add_(low)
        return x.contiguous(memory_format=torch.channels_last)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Stored-space latents of images x (from `to_input`): float32 (B, C, h, w), the
        posterior mean and log std (None for a deterministic model). Compile-friendly."""
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        """Images (B, 3, H, W), float32 in the image range, from stored-space latents z."""
        return self.model.decode(z.to(self.device, self.dtype)).sample.float()

    def to_uint8(self, images: Tensor) -> Tensor:
        """Decoded images (B, 3, H, W) in the image range to uint8 (B, H, W, 3)."""
        low, high = self.image_range
        x = (images.clamp(low, high) - low) * (PIXEL_MAX / (high - low))
        return x.round().to(torch.uint8).permute(0, 2, 3, 1)

    def decode_to_uint8(self, z: Tensor, *, to_cpu: bool = True) -> Tensor:
        """uint8 images (B, H, W, 3) from stored-space latents, on the CPU (or left on the model's
        device, with `to_cpu=False`, for a copy that does not wait)."""
        with torch.inference_mode():
            images = self.to_uint8(self.decode(z.to(self.device)))
        return images.cpu() if to_cpu else images

    def materialize(self, model) -> None:
        """Fill in a decoder-only model's non-persistent buffers (built on the meta device)."""

    def describe(self) -> dict[str, Any]:
        """The facts, for logs and messages."""
        return {
            "family": self.family,
            "image_range": self.image_range,
            "posterior": self.posterior,
            "spatial_factor": self.spatial_factor,
            "latent_channels": self.latent_channels,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "normalized_by": self.normalized_by,
        }
