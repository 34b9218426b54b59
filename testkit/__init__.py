"""Tiny real components for tests and benchmarks (in the spirit of `zarr.testing`).

    from testkit import make_tiny_vae, write_random_store, tiny_dit
    store = write_random_store(tmp / "s.zarr", n=40)     # through the real writer
    vae_dir = make_tiny_vae(tmp / "vae")                 # save_pretrained, load with from_pretrained
    rae_dir = TINY_AUTOENCODERS["rae-dinov2"].make(tmp / "rae")   # every autoencoder family

`testkit.s3` (imported on its own: it needs moto) runs a local S3-compatible server.

Everything is built by the real code paths (the store's writer, diffusers' autoencoders of every family, the
trainer's DiT and checkpoint writer), only small.
"""

from testkit.autoencoders import TINY_AUTOENCODERS
from testkit.dinov2 import make_tiny_dinov2
from testkit.inception import make_tiny_inception
from testkit.models import TINY_DIT, make_checkpoint, make_tiny_vae, make_vae, tiny_dit
from testkit.stores import make_spec, random_latents, write_random_store

__all__ = [
    "TINY_AUTOENCODERS",
    "TINY_DIT",
    "make_checkpoint",
    "make_spec",
    "make_tiny_dinov2",
    "make_tiny_inception",
    "make_tiny_vae",
    "make_vae",
    "random_latents",
    "tiny_dit",
    "write_random_store",
]
