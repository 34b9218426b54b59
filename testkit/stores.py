"""Stores of random latents written by the real writer: tests' fixtures and benchmarks' inputs."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np

from foundation.urls import is_url
from latent_store import (
    AddedArrayWriter,
    ArraySpec,
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
from latent_store.arrays import latent_arrays
from latent_store.checksums import shard_checksum
from latent_store.provenance import PROVENANCE_KEY
from latent_store.quantize import quantize
from latent_store.schema import ATTRS_KEY
from latent_store.sealing import LEGACY_CHECKSUM


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
    format_version: int = StoreSpec.format_version,
    extra: tuple = (),
) -> StoreSpec:
    """The spec of a small store: `classes` classes n00000000.., quantization calibrated once.

    format_version 1: a store as latentdit wrote them before arrays were declared. extra:
    declarations (`ArraySpec`) of arrays made with the store beside the latents.
    """
    quant = quant or calibrate(random_latents(64, channels, size, variants, seed=99))
    return StoreSpec(
        num_samples=n,
        arrays=(*latent_arrays((channels, size, size), quant), *extra),
        vae=VaeInfo(id=vae_id, scaling_factor=scaling_factor, latent_channels=channels),
        image_size=size * VaeInfo(id=vae_id).downsampling,  # what an 8x VAE makes these from
        classes=tuple(
            ClassInfo(index=i, id=f"n{i:08d}", name=f"class {i}") for i in range(classes)
        ),
        variants=("image", "hflip")[:variants],
        chunk_size=chunk,
        shard_size=shard,
        source={"kind": "test"},
        format_version=format_version,
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
    `legacy`: the store as a latentdit before seals existed left it: format v1, blake2b-128
    shard records (the real writer with the old checksum) and no sealed provenance. Arrays
    declared in `extra` (see `make_spec`) hold random rows of their declared dtype.
    """
    if legacy:
        old = partial(shard_checksum, algorithm=LEGACY_CHECKSUM)
        with mock.patch("latent_store.writer.shard_checksum", old):
            write_random_store(path, n, failures=failures, seed=seed, format_version=1, **spec_kw)
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
        arrays = {"latents": q.numpy(), **random_rows(spec, a, b, seed)}
        writer.write_shard(
            shard,
            arrays,
            labels[a:b],
            failures=fails,
            image_modes={"RGB": b - a},
            clipped={"latents": clipped},
        )
    finalize_store(store)
    return path if is_url(path) else Path(path)  # a URL stays a string: Path() drops a slash


def random_rows(spec: StoreSpec, start: int, stop: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows [start, stop) of every array the spec declares besides the latents (and logstd):
    seeded per sample, of the declared dtype, the channels apart in mean and spread."""
    rows = {}
    for array in spec.arrays[1:]:
        shape = spec.row_shape(array.name)
        x = np.stack(
            [np.random.default_rng([seed, i]).standard_normal(shape) for i in range(start, stop)]
        )
        x = x * (1 + np.arange(array.channels)).reshape(-1, *[1] * (len(array.shape) - 1))
        if array.quant is not None:
            codes, _ = quantize(x.astype(np.float32), array.quant, dims=len(array.shape) - 1)
            rows[array.name] = codes.numpy()
        else:
            rows[array.name] = x.astype(array.dtype)
    return rows


def unseal(path: str | Path) -> None:
    """Remove a store's sealed provenance, as stores written before seals existed lack it."""
    group = open_store(path, mode="r+").group
    attrs = dict(group.attrs[ATTRS_KEY])
    del attrs[PROVENANCE_KEY]
    group.attrs[ATTRS_KEY] = attrs


def copy_declaration(spec: StoreSpec, name: str = "feat") -> ArraySpec:
    """An array to add to a store: shaped, quantized and varied like its latents."""
    latents = spec.array("latents")
    return ArraySpec(
        name=name, shape=latents.shape, quant=latents.quant, description="a copy of the latents"
    )


def fill_added(writer: AddedArrayWriter, source: str = "latents") -> None:
    """Write every shard in `writer.todo` of its added array with the codes of array `source`."""
    for shard in list(writer.todo):
        rows = writer.store.read_shard(shard, [source])[source]
        writer.write_shard(shard, rows)
