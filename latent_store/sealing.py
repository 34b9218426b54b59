"""Seal a store written before seals existed, once every check on it passes.

    latentdit validate STORE --seal

Stores written before the sealed provenance (`latent_store.provenance`) have shard records and
checksums but no seal, and readers refuse them. `seal_store` runs the full `validate`; only when
every check but the missing seal passes does it write the seal over the metadata and keys as
they are, so a store whose data contradicts its records, or whose metadata is implausible, is
never sealed. A store sealed already is left as it is.
"""

from __future__ import annotations

import os

from latent_store.config import DEFAULT_MAX_CLIPPED
from latent_store.errors import StoreSealError
from latent_store.provenance import PROVENANCE_KEY, provenance_problems, seal
from latent_store.schema import ATTRS_KEY
from latent_store.store import LatentStore, open_store
from latent_store.validate import Check, validate_store
from latent_store.verify import read_keys

SEALED_NOW = "sealed now: metadata and keys as validated"
LEGACY_CHECKSUM = "blake2b-128"  # what shard records held before stores were sealed
REENCODE = "re-encode it with the same command and a new --out"


def seal_store(
    path: str | os.PathLike | LatentStore, *, max_clipped: float = DEFAULT_MAX_CLIPPED
) -> list[Check]:
    """Validate a store and, when only its seal is missing, write the seal; returns the checks.

    Raises StoreSealError (one line, nothing written) when another check fails, or when the
    store has a seal that its metadata no longer matches.
    """
    store = open_store(path)
    checks = validate_store(store, max_clipped=max_clipped)
    failed = [c for c in checks if not c.ok and c.name != "provenance"]
    if failed:
        names = ", ".join(c.name for c in failed)
        raise StoreSealError(
            f"{store.path}: not sealed: {len(failed)} checks fail ({names}), first: "
            f"{failed[0].message}; see `latentdit validate {store.path}`"
        )
    provenance = next(c for c in checks if c.name == "provenance")
    if provenance.ok:
        return checks  # sealed already, and intact: nothing to write
    if PROVENANCE_KEY in store.attrs:
        raise StoreSealError(
            f"{store.path}: not resealed: it is sealed already and {provenance.message}; restore "
            f"the store from a copy, or {REENCODE}"
        )
    kinds = {r.checksum.partition(":")[0] for r in store.records() if r is not None}
    if kinds - {LEGACY_CHECKSUM}:
        raise StoreSealError(
            f"{store.path}: not sealed: its shard records ({', '.join(sorted(kinds))}) were "
            "written by a latentdit that seals every store it creates, so its seal was removed; "
            f"restore the store from a copy, or {REENCODE}"
        )
    _write_seal(store)
    return [Check("provenance", True, SEALED_NOW) if c.name == "provenance" else c for c in checks]


def _write_seal(store: LatentStore) -> None:
    """Seal the store's attributes and keys as they are, then check the seal reads back."""
    writable = store.reopen("r+")
    attrs = dict(writable.group.attrs[ATTRS_KEY])
    attrs[PROVENANCE_KEY] = seal(attrs, read_keys(writable))
    writable.group.attrs[ATTRS_KEY] = attrs
    reopened = store.reopen("r")
    if problems := provenance_problems(reopened.attrs, read_keys(reopened)):
        raise StoreSealError(f"{store.path}: the seal written does not read back: {problems[0]}")
