"""A latent store as an image set: its stored latents decoded by the VAE decoder alone.

    latentdit evaluate train.zarr --ref val_stats.npz     # how close the VAE alone gets
    latentdit evaluate s3://bucket/train.zarr --ref val_stats.npz [--storage-options JSON]

Scored against real images, these give the reconstruction floor: the FID a generator that
reproduced the stored latents exactly would reach. Shards are read whole, in order; the image
variant (not the flip) of each written sample is decoded with the decoder-only loader the
sampler uses (`foundation.autoencoders.loading.load_decoder`, any family), the encoder's weights
never being read; an autoencoder that does not make the store's latents is refused first.
Batches run across shard boundaries (cut at multiples of the batch size from sample 0), so a
rank's share of whole batches reads only the shards it overlaps.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from evaluation.inputs import ImageSet, rebatch
from foundation.autoencoders.loading import load_decoder
from latent_store import LatentStore, SchemaMismatchError, dequantize, load_latents, open_store

IMAGE_VARIANT = 0  # (N, V, C, h, w): V = 0 is the image, 1 its flip


def open_store_images(
    path: str | Path,
    *,
    limit: int | None = None,
    vae: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
) -> ImageSet:
    """The decoded images of the first `limit` written samples of the store at `path` (a folder
    or an fsspec URL, opened with `storage_options`)."""
    store = open_store(path, storage_options=storage_options)
    shards = store.require_complete()
    counts = [r.written for r in store.records()]
    total = sum(counts[s] for s in shards)
    count = total if limit is None else min(limit, total)
    spec = store.spec

    def read(batch_size: int, start: int, stop: int) -> Iterator[np.ndarray]:
        vae_id = vae or spec.vae.id
        decoder = load_decoder(vae_id, revision=None if vae else spec.vae.revision, device=device)
        if why := decoder.misfit(
            family=spec.vae.cls, image_size=spec.image_size, latent_shape=spec.latent_shape
        ):
            raise SchemaMismatchError(
                f"--vae {vae_id} does not decode this store ({why}; encoded with {spec.vae.id}): "
                "pass the store's autoencoder as --vae"
            )
        for codes in rebatch(_codes(store, shards, counts, start, stop), batch_size):
            z = dequantize(torch.from_numpy(codes), spec.quant)
            yield decoder.decode_to_uint8(z).numpy()

    return ImageSet("store", path if isinstance(path, str) else Path(path), count, read)


def _codes(store: LatentStore, shards: list[int], counts: list[int], start: int, stop: int):
    """The image variant's codes of written samples [start, stop), one chunk per shard read."""
    offset = 0
    for shard in shards:
        a, b = max(start - offset, 0), min(stop - offset, counts[shard])
        if a < b:
            yield load_latents(store, shards=[shard]).latents[a:b, IMAGE_VARIANT]
        offset += counts[shard]
        if offset >= stop:
            return
