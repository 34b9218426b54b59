"""Typed errors. Every user-facing failure in latentdit derives from `LatentditError`.

The CLI turns any `LatentditError` into one line on stderr and exit code 2, so messages must
name the bad value and say what to do.
"""


class LatentditError(Exception):
    """Root of the errors a user can act on (bad input, incomplete data, mismatched files)."""


class StoreError(LatentditError):
    """A problem with a latent store."""


class StoreNotFoundError(StoreError):
    """The path holds no latent store."""


class StoreExistsError(StoreError):
    """A store already exists where a new one was to be created."""


class SchemaMismatchError(StoreError):
    """The store's metadata or arrays disagree with what the caller or the format expects."""


class StoreIncompleteError(StoreError):
    """Some shards have no completion marker."""


class StoreCorruptError(StoreError):
    """Data on disk does not match its checksum or cannot be read."""


class StoreReadError(StoreError):
    """Reading from the store kept failing (network, credentials, endpoint) after retries."""
