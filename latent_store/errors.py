"""The store's typed errors, under the project-wide root `foundation.errors.LatentditError`."""

from foundation.errors import LatentditError

__all__ = [
    "LatentditError",
    "SchemaMismatchError",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreIncompleteError",
    "StoreNotFoundError",
    "StoreReadError",
]


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


class StoreSealError(StoreError):
    """A store cannot be sealed: a check fails, or it is sealed already with other contents."""
