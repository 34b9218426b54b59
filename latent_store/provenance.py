"""The sealed provenance of a store: a digest over the metadata that defines what the codes mean.

    attrs["latentdit"]["provenance"] = {"digest": "blake2b-128:...", "fields": {name: digest}}

Written by `create_store`, over the fields of SEALED[format version] (the array declarations
with their quantization, the VAE and its factors, image size and crop, posterior mode, variants,
classes, layout, the source) and the sample keys. One digest per field lets a reader name what
was edited; the top digest covers the field digests, so editing those is reported too.

Declaring an array on an existing store (`latent_store.added`) extends the seal, never redoes
it: only once the seal checks out, the field "added_arrays" gets its digest, the others keep
theirs, and the previous top digest is kept in "previous". Editing any sealed field, the added
declarations included, still shows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from latent_store.schema import ADDED_KEY

PROVENANCE_KEY = "provenance"
KEYS_FIELD = "keys"  # the sample keys (an array, not an attribute) are sealed as well
COMMON = ("format_version", "num_samples", "variants", "posterior", "vae", "image_size", "crop")
COMMON += ("classes", "source", "chunk_size", "shard_size")
SEALED = {
    1: (*COMMON, "latent_shape", "quant", "logstd_quant"),  # the v1 declaration's fields
    2: (*COMMON, "arrays"),
}
DIGEST = "blake2b-128"
UNSEALED = "no sealed provenance in its metadata (removed, or written by an older latentdit)"


def _digest(data: bytes) -> str:
    return f"{DIGEST}:{hashlib.blake2b(data, digest_size=16).hexdigest()}"


def _canonical(value: Any) -> bytes:
    """JSON with sorted keys and no spaces: equal for equal metadata, whatever wrote it."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def keys_digest(keys: np.ndarray) -> str:
    """Digest of the sample keys, in order (NUL-separated: keys are paths and never hold NUL)."""
    return _digest("\0".join(map(str, np.asarray(keys).tolist())).encode())


def _sealed_fields(attrs: Mapping[str, Any], sealed: Mapping[str, Any]) -> tuple[str, ...]:
    """The fields a store's seal covers: its version's, and "added_arrays" once there are any."""
    names = SEALED.get(attrs.get("format_version"), SEALED[2])
    return (*names, ADDED_KEY) if ADDED_KEY in attrs or ADDED_KEY in sealed else names


def _field_digests(attrs: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, str]:
    return {name: _digest(_canonical(attrs.get(name))) for name in names}


def seal(attrs: Mapping[str, Any], keys: np.ndarray) -> dict[str, Any]:
    """The provenance block of a store's attributes (`StoreSpec.to_attrs()`) and its keys."""
    fields = _field_digests(attrs, _sealed_fields(attrs, {}))
    fields[KEYS_FIELD] = keys_digest(keys)
    return {"digest": _digest(_canonical(fields)), "fields": fields}


def extend_seal(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance block of `attrs`, whose seal checked out before ADDED_KEY changed: that
    field's digest added (or replaced), the others as sealed, the old top digest kept."""
    block = attrs[PROVENANCE_KEY]
    fields = {**block["fields"], ADDED_KEY: _digest(_canonical(attrs.get(ADDED_KEY)))}
    previous = [*block.get("previous", []), block["digest"]]
    return {"digest": _digest(_canonical(fields)), "fields": fields, "previous": previous}


def provenance_problems(attrs: Mapping[str, Any], keys: np.ndarray | None) -> list[str]:
    """What differs from the sealed provenance ([] when intact). `keys` None: not readable."""
    block = attrs.get(PROVENANCE_KEY)
    if not isinstance(block, Mapping) or not isinstance(block.get("fields"), Mapping):
        return [UNSEALED]
    sealed = dict(block["fields"])
    if block.get("digest") != _digest(_canonical(sealed)):
        return ["its provenance block was edited (the digest does not cover its field digests)"]
    now = _field_digests(attrs, _sealed_fields(attrs, sealed))
    if keys is not None:
        now[KEYS_FIELD] = keys_digest(keys)
    edited = [name for name in now if sealed.get(name) != now[name]]
    if not edited:
        return []
    return [f"metadata edited since it was sealed at encoding: {', '.join(edited)}"]
