"""Errors of the sampler; all are `LatentditError`s, so the CLI prints them as one line."""

from foundation.errors import LatentditError


class SamplerError(LatentditError):
    """Bad sampling input: an unknown class, solver or option, a missing checkpoint."""


class VaeMismatchError(SamplerError):
    """The checkpoint's latents do not fit the VAE chosen to decode them."""


class CheckpointImportError(LatentditError):
    """A file that cannot be imported as an official DiT/SiT checkpoint, or flags that contradict it."""
