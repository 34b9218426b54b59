"""Claim a store for one encode job, and create it so that an interrupted creation is recognized.

    lock = store_lock("stores/in256.zarr", None)    # stores/in256.zarr.lock, beside the store
    lock.acquire()                                   # a second encode into it is refused
    clear_half_made(out, options)                    # what an interrupted creation left: removed
    create_store_marked(out, spec, keys, options)    # stores/in256.zarr.creating while it runs

Creating a store writes several objects (group metadata, arrays, keys) that no file system
renames atomically everywhere (an object store has no rename at all). So a marker beside the
store is written first and removed last: a store whose creation was cut short (a full disk,
SIGTERM, an outage) is recognized by the next run of the same command, which removes it and
creates it again, instead of refusing it forever. The same code serves folders and fsspec URLs;
it runs on rank 0 while that rank holds the store's lock, so no live creator is ever removed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from fsspec.core import url_to_fs

from foundation.atomic import write_atomic
from foundation.faults import note_doing
from foundation.locks import Lock
from foundation.urls import is_url
from latent_store import LatentStore, StoreSpec, create_store

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
CREATING_SUFFIX = ".creating"


def sidecar(out: str | os.PathLike, suffix: str) -> str:
    """The path of a file beside the store: OUT + suffix (a URL stays a URL)."""
    return str(out).rstrip("/") + suffix


def store_lock(out: str | os.PathLike, storage_options: dict | None) -> Lock:
    """The lock of a store being written (not taken yet): one encode job writes it at a time."""
    return Lock(sidecar(out, LOCK_SUFFIX), what=f"store {out}", storage_options=storage_options)


def _fs(path: str, storage_options: dict | None):
    """(file system, path in it) of a local path or a URL (with its storage options)."""
    options = (storage_options or {}) if is_url(path) else {}
    return url_to_fs(path, **options)


def clear_half_made(out: str | os.PathLike, storage_options: dict | None) -> bool:
    """Remove a store whose creation was interrupted (its marker is there); True if one was."""
    marker = sidecar(out, CREATING_SUFFIX)
    fs, marker_path = _fs(marker, storage_options)
    if not fs.exists(marker_path):
        return False
    log.warning(
        "%s: its creation was interrupted (%s is there); removing the half-made store to create "
        "it again",
        out,
        marker,
    )
    _remove(out, storage_options)
    fs.rm_file(marker_path)
    return True


def _remove(out: str | os.PathLike, storage_options: dict | None) -> None:
    fs, path = _fs(str(out).rstrip("/"), storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def create_store_marked(
    out: str | os.PathLike,
    spec: StoreSpec,
    keys: Sequence[str],
    storage_options: dict | None,
    then: Callable[[LatentStore], None] | None = None,
) -> LatentStore:
    """`latent_store.create_store` between writing and removing the marker OUT.creating.

    `then(store)` writes what belongs to the store's creation beyond its arrays (a feature
    projection) before the marker goes, so it is redone with the rest if it is cut short.
    On a failure the half-made store is removed at once where possible (a full disk gets its
    space back); if even that fails, the marker stays for the next run to act on.
    """
    marker = sidecar(out, CREATING_SUFFIX)
    if is_url(marker):
        fs, marker_path = _fs(marker, storage_options)
        fs.pipe_file(marker_path, b"latentdit: creating this store\n")
    else:
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, "latentdit: creating this store\n")
    try:
        store = create_store(out, spec, keys, storage_options=storage_options)
        if then is not None:
            then(store)
    except BaseException as e:
        note_doing(e, f"creating the store {out}")
        try:
            clear_half_made(out, storage_options)
        except Exception:  # the disk or the store is what failed; the marker tells the next run
            log.debug("could not remove the half-made store %s now", out, exc_info=True)
        raise
    fs, marker_path = _fs(marker, storage_options)
    fs.rm_file(marker_path)
    return store
