"""The latent store: the on-disk format (Zarr v3, uint8 latents + labels) and the only code that knows it.

Names are imported on first use (PEP 562), so a light module of the store (its config, its
schema constants) can be imported without loading zarr. The codec's functions are imported from
their module (`from latent_store.quantize import quantize`): the name `quantize` is the module.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "AddedArrayWriter": "added",
    "ArraySpec": "arrays",
    "Check": "validate",
    "ClassInfo": "schema",
    "FORMAT_VERSION": "schema",
    "Failure": "records",
    "LABEL_FILL": "schema",
    "LatentArrays": "reader",
    "LatentStore": "store",
    "LatentditError": "errors",
    "QuantParams": "quantize",
    "SchemaMismatchError": "errors",
    "ShardRecord": "records",
    "StoreCorruptError": "errors",
    "StoreError": "errors",
    "StoreExistsError": "errors",
    "StoreIncompleteError": "errors",
    "StoreNotFoundError": "errors",
    "StoreReadError": "errors",
    "StoreSealError": "errors",
    "StoreSpec": "schema",
    "StoreWriter": "writer",
    "VARIANTS": "schema",
    "VaeInfo": "schema",
    "add_array": "added",
    "calibrate": "quantize",
    "create_store": "store",
    "dequantize": "quantize",
    "describe_store": "summary",
    "finalize_store": "finalize",
    "iter_shards": "reader",
    "load_latents": "reader",
    "open_store": "store",
    "seal_store": "sealing",
    "shard_order": "reader",
    "validate_store": "validate",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    """Import `name` from its submodule on first use."""
    if name in _HOMES:
        value = getattr(importlib.import_module(f"latent_store.{_HOMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'latent_store' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
