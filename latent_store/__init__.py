"""The latent store: the on-disk format (Zarr v3, uint8 latents + labels) and the only code that knows it."""

from foundation.urls import is_url, parse_storage_options
from latent_store.errors import (
    LatentditError,
    SchemaMismatchError,
    StoreCorruptError,
    StoreError,
    StoreExistsError,
    StoreIncompleteError,
    StoreNotFoundError,
    StoreReadError,
)
from latent_store.quantize import QuantParams, calibrate, dequantize, quantize
from latent_store.reader import LatentArrays, iter_shards, load_latents, shard_order
from latent_store.schema import (
    FORMAT_VERSION,
    LABEL_FILL,
    VARIANTS,
    ClassInfo,
    Failure,
    ShardRecord,
    StoreSpec,
    VaeInfo,
)
from latent_store.store import LatentStore, create_store, open_store
from latent_store.summary import describe_store
from latent_store.validate import Check, validate_store
from latent_store.writer import StoreWriter, finalize_store

__all__ = [
    "FORMAT_VERSION",
    "LABEL_FILL",
    "VARIANTS",
    "Check",
    "ClassInfo",
    "Failure",
    "LatentArrays",
    "LatentStore",
    "LatentditError",
    "QuantParams",
    "SchemaMismatchError",
    "ShardRecord",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreIncompleteError",
    "StoreNotFoundError",
    "StoreReadError",
    "StoreSpec",
    "StoreWriter",
    "VaeInfo",
    "calibrate",
    "create_store",
    "dequantize",
    "describe_store",
    "finalize_store",
    "is_url",
    "iter_shards",
    "load_latents",
    "open_store",
    "parse_storage_options",
    "quantize",
    "shard_order",
    "validate_store",
]
