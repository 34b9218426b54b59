"""Small arrays attached to a declared array (e.g. the projection its values were reduced with).

    made_by = {..., "attached": {"projection": attachment_checksum(values)}}   # in the declaration
    store = create_store(...) or add_array(...)                                  # seals it
    write_attached(store, "features", "projection", values)                     # beside the data
    values = read_attached(store, "features", "projection")                     # checked

An attachment is one whole float or integer array in the Zarr array `<name>_<key>`, one chunk,
uncompressed. Its checksum (over dtype, shape and bytes) sits in the array's declaration
(`ArraySpec.made_by["attached"]`), which the store's seal covers, so an edited or replaced
attachment is refused by `read_attached` and reported by `validate`. Write it right after the
declaration is made (or before, on a store that exists): the declaration names what must be there.
"""

from __future__ import annotations

import numpy as np

from latent_store.checksums import shard_checksum
from latent_store.errors import SchemaMismatchError, StoreCorruptError, StoreReadError
from latent_store.store import LatentStore

ATTACHED = "attached"  # the key of made_by that names an array's attachments


def attached_name(array: str, key: str) -> str:
    """The Zarr array that holds attachment `key` of declared array `array`."""
    return f"{array}_{key}"


def attachment_checksum(values: np.ndarray) -> str:
    """The checksum a declaration records for `values`: over its dtype, shape and bytes."""
    values = np.ascontiguousarray(values)
    header = np.frombuffer(f"{values.dtype.str}{values.shape}".encode(), np.uint8)
    return shard_checksum({"header": header, "values": values})


def attachments(store: LatentStore, array: str) -> dict[str, str]:
    """{key: checksum} of the attachments array `array` declares."""
    made_by = store.spec.array(array).made_by or {}
    return dict(made_by.get(ATTACHED) or {})


def write_attached(store: LatentStore, array: str, key: str, values: np.ndarray) -> None:
    """Write attachment `key` of `array` (replacing what a crashed run left). One process."""
    values = np.ascontiguousarray(values)
    group = store.reopen("r+").group
    created = group.create_array(
        attached_name(array, key),
        shape=values.shape,
        dtype=values.dtype,
        chunks=values.shape,
        compressors=None,
        overwrite=True,
    )
    created[...] = values


def read_attached(store: LatentStore, array: str, key: str) -> np.ndarray:
    """Attachment `key` of `array`, checked against its declared checksum; StoreCorruptError
    (one line, naming the fix) when it is missing, unreadable or not what was declared."""
    if not (problems := _problems(store, array, key)):
        return _read(store, array, key)
    raise StoreCorruptError(
        f"{store.path}: {problems[0]}; restore the store from a copy, or encode it again to a "
        "new --out"
    )


def attached_problems(store: LatentStore) -> list[str]:
    """Every declared attachment that is missing, unreadable or not what was declared."""
    problems = []
    for array in store.spec.arrays:
        for key in attachments(store, array.name):
            problems += _problems(store, array.name, key)
    return problems


def _read(store: LatentStore, array: str, key: str) -> np.ndarray:
    name = attached_name(array, key)
    return store.fetch(lambda: store.array(name)[...], f"{store.path}/{name}")


def _problems(store: LatentStore, array: str, key: str) -> list[str]:
    declared = attachments(store, array).get(key)
    name = attached_name(array, key)
    if declared is None:
        return [f"array {array!r} declares no attachment {key!r}"]
    try:
        values = _read(store, array, key)
    except SchemaMismatchError:  # the store has no such Zarr array
        return [f"{name} (attached to {array!r}) is missing"]
    except StoreReadError:  # the store cannot be reached: not damage
        raise
    except Exception as e:  # zarr's codecs raise what they raise on damaged bytes
        return [f"{name} (attached to {array!r}) is unreadable ({type(e).__name__})"]
    if (actual := attachment_checksum(values)) != declared:
        return [
            f"{name} (attached to {array!r}): checksum {actual}, its declaration says {declared}"
        ]
    return []
