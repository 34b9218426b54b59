"""Vision-encoder features added to a finished test store, from deterministic synthetic values.

    add_features(store, dims=24, tokens=16)             # "features": (24, 16) per variant, uint8
    add_features(store, dims=24, tokens=16, cls=True)   # and "features_cls": (24, 1)

Written through the real path for arrays added later (`latent_store.added`): `add_array`, an
`AddedArrayWriter` per array, `finalize_store`. The names and layouts are the ones
`latentdit encode --features` stores (docs/encode.md): patch tokens (D, T) channel first, T = h*w
in row-major order, and the class token (D, 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from latent_store import (
    AddedArrayWriter,
    ArraySpec,
    add_array,
    calibrate,
    finalize_store,
    open_store,
)
from latent_store.quantize import quantize

FEATURES, FEATURES_CLS = "features", "features_cls"


def synthetic_features(n: int, variants: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """(n, V, *shape) float32 values: sample i's rows from a generator seeded (seed, i), the
    channels apart in mean and spread."""
    rows = [np.random.default_rng([seed, i]).standard_normal((variants, *shape)) for i in range(n)]
    channels = np.arange(shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    return (np.stack(rows) * (1 + channels / shape[0]) + channels / shape[0]).astype(np.float32)


def add_features(
    path: str | Path,
    *,
    dims: int = 24,
    tokens: int = 16,
    cls: bool = False,
    dtype: str = "uint8",
    seed: int = 0,
    description: str = "synthetic encoder tokens (testkit)",
) -> Path:
    """Add `features` (dims, tokens) (and with `cls` `features_cls` (dims, 1)) to a complete
    store; uint8 per-channel quantized, or `dtype` "float16" stored as is."""
    store = open_store(path)
    spec = store.spec
    variants, n = len(spec.variants), spec.num_samples
    shapes = {FEATURES: (dims, tokens), **({FEATURES_CLS: (dims, 1)} if cls else {})}
    for k, (name, shape) in enumerate(shapes.items()):
        values = synthetic_features(n, variants, shape, seed + k)
        quant = calibrate(values, dims=1) if dtype == "uint8" else None
        array = ArraySpec(name=name, shape=shape, quant=quant, dtype=dtype, description=description)
        writer = AddedArrayWriter(add_array(path, array), name)
        for shard in list(writer.todo):
            a, b = spec.shard_bounds(shard)
            rows = values[a:b] if quant is None else quantize(values[a:b], quant, dims=1)[0]
            writer.write_shard(shard, np.asarray(rows, dtype=dtype))
        finalize_store(open_store(path))
    return Path(path)
