"""The root of latentdit's errors. Every user-facing failure derives from `LatentditError`.

The CLI turns any `LatentditError` into one line on stderr and exit code 2, so messages must
name the bad value and say what to do.
"""


class LatentditError(Exception):
    """Root of the errors a user can act on (bad input, incomplete data, mismatched files)."""


class ConfigError(LatentditError):
    """An option or an options file is invalid."""


class VaeLoadError(LatentditError):
    """The VAE cannot be loaded: missing weights, not a VAE, offline without a cache."""
