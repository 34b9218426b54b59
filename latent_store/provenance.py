"""The sealed provenance of a store: a digest over the metadata that defines what the codes mean.

    attrs["latentdit"]["provenance"] = {"digest": "blake2b-128:...", "fields": {name: digest}}

Written once by `create_store`, over SEALED (the quantization, the VAE and its factors, image
size and crop, posterior mode, variants, classes, shape and layout, the source) and the sample
keys. One digest per field lets a reader name what was edited; the top digest covers the field
digests, so editing those is reported too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

PROVENANCE_KEY = "provenance"
KEYS_FIELD = "keys"  # the sample keys (an array, not an attribute) are sealed as well
SEALED = (
    "format_version",
    "num_samples",
    "latent_shape",
    "variants",
    "posterior",
    "quant",
    "logstd_quant",
    "vae",
    "image_size",
    "crop",
    "classes",
    "source",
    "chunk_size",
    "shard_size",
)
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


def seal(attrs: Mapping[str, Any], keys: np.ndarray) -> dict[str, Any]:
    """The provenance block of a store's attributes (`StoreSpec.to_attrs()`) and its keys."""
    fields = {name: _digest(_canonical(attrs.get(name))) for name in SEALED}
    fields[KEYS_FIELD] = keys_digest(keys)
    return {"digest": _digest(_canonical(fields)), "fields": fields}


def provenance_problems(attrs: Mapping[str, Any], keys: np.ndarray | None) -> list[str]:
    """What differs from the sealed provenance ([] when intact). `keys` None: not readable."""
    block = attrs.get(PROVENANCE_KEY)
    if not isinstance(block, Mapping) or not isinstance(block.get("fields"), Mapping):
        return [UNSEALED]
    sealed = dict(block["fields"])
    if block.get("digest") != _digest(_canonical(sealed)):
        return ["its provenance block was edited (the digest does not cover its field digests)"]
    if keys is None:
        now = {name: _digest(_canonical(attrs.get(name))) for name in SEALED}
    else:
        now = seal(attrs, keys)["fields"]
    edited = [name for name in now if sealed.get(name) != now[name]]
    if not edited:
        return []
    return [f"metadata edited since it was sealed at encoding: {', '.join(edited)}"]
