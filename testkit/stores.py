"""Stores of random latents written by the real writer: tests' fixtures and benchmarks' inputs."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np

from foundation.urls import is_url
from latent_store import (
    ClassInfo,
    Failure,
    StoreSpec,
    StoreWriter,
    VaeInfo,
    calibrate,
    create_store,
    finalize_store,
    open_store,
)
from latent_store.provenance import PROVENANCE_KEY
from latent_store.quantize import quantize
from latent_store.schema import ATTRS_KEY
from latent_store.sealing import LEGACY_CHECKSUM
from latent_store.store import shard_checksum


def random_latents(n: int, channels: int = 4, size: int = 8, variants: int = 1, seed: int = 0):
    """Float latents (n, V, C, H, W) with a different mean and std per channel."""
    rng = np.random.default_rng(seed)
    mean = np.linspace(-1, 1, channels).reshape(1, 1, channels, 1, 1)
    std = np.linspace(0.5, 2, channels).reshape(1, 1, channels, 1, 1)
    x = rng.standard_normal((n, variants, channels, size, size)) * std + mean
    return x.astype(np.float32)


def make_spec(
    n: int,
    *,
    channels: int = 4,
    size: int = 8,
    variants: int = 1,
    classes: int = 3,
    chunk: int = 4,
    shard: int = 16,
    quant=None,
    vae_id: str = "tests/tiny-vae",
    scaling_factor: float = 0.5,
) -> StoreSpec:
    """The spec of a small store: `classes` classes n00000000.., quantization calibrated once."""
    return StoreSpec(
        num_samples=n,
        latent_shape=(channels, size, size),
        quant=quant or calibrate(random_latents(64, channels, size, variants, seed=99)),
        vae=VaeInfo(id=vae_id, scaling_factor=scaling_factor, latent_channels=channels),
        image_size=size * VaeInfo(id=vae_id).downsampling,  # what an 8x VAE makes these from
        classes=tuple(
            ClassInfo(index=i, id=f"n{i:08d}", name=f"class {i}") for i in range(classes)
        ),
        variants=("image", "hflip")[:variants],
        chunk_size=chunk,
        shard_size=shard,
        source={"kind": "test"},
    )


def write_random_store(
    path: str | Path,
    n: int = 40,
    *,
    failures: Iterable[int] = (),
    seed: int = 0,
    legacy: bool = False,
    **spec_kw,
) -> str | Path:
    """Create a store (a folder, or at a URL) and write all its shards; `failures` are sample indices left unwritten.

    Labels cycle through the classes (sample i has class i % classes); keys look like ImageNet
    paths. `spec_kw` goes to `make_spec` (channels, size, variants, classes, chunk, shard, ...).
    `legacy`: the store as a latentdit before seals existed left it: blake2b-128 shard records
    (the real writer with the old checksum) and no sealed provenance.
    """
    if legacy:
        old = partial(shard_checksum, algorithm=LEGACY_CHECKSUM)
        with mock.patch("latent_store.writer.shard_checksum", old):
            write_random_store(path, n, failures=failures, seed=seed, **spec_kw)
        unseal(path)
        return path if is_url(path) else Path(path)
    failures = list(failures)
    spec = make_spec(n, **spec_kw)
    store = create_store(
        path, spec, [f"train/n{i % spec.num_classes:08d}/{i}.JPEG" for i in range(n)]
    )
    x = random_latents(n, spec.latent_shape[0], spec.latent_shape[1], len(spec.variants), seed)
    labels = (np.arange(n) % spec.num_classes).astype(np.int16)
    labels[failures] = -1
    writer = StoreWriter(store)
    for shard in range(spec.num_shards):
        a, b = spec.shard_bounds(shard)
        fails = [
            Failure(index=i, key=f"k{i}", reason="decode: broken") for i in failures if a <= i < b
        ]
        q, clipped = quantize(x[a:b], spec.quant)
        writer.write_shard(
            shard,
            q.numpy(),
            labels[a:b],
            failures=fails,
            image_modes={"RGB": b - a},
            clipped=clipped,
        )
    finalize_store(store)
    return path if is_url(path) else Path(path)  # a URL stays a string: Path() drops a slash


def unseal(path: str | Path) -> None:
    """Remove a store's sealed provenance, as stores written before seals existed lack it."""
    group = open_store(path, mode="r+").group
    attrs = dict(group.attrs[ATTRS_KEY])
    del attrs[PROVENANCE_KEY]
    group.attrs[ATTRS_KEY] = attrs
