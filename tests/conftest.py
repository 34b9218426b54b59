"""Shared fixtures: tiny stores written by the real writer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from latent_store import (
    ClassInfo,
    StoreSpec,
    StoreWriter,
    VaeInfo,
    calibrate,
    create_store,
    finalize_store,
    quantize,
)

ROOT = Path(__file__).resolve().parents[1]


def random_latents(n: int, channels: int = 4, size: int = 8, variants: int = 1, seed: int = 0):
    """Float latents (n, V, C, H, W) with a different mean and std per channel."""
    rng = np.random.default_rng(seed)
    mean = np.linspace(-1, 1, channels).reshape(1, 1, channels, 1, 1)
    std = np.linspace(0.5, 2, channels).reshape(1, 1, channels, 1, 1)
    x = rng.standard_normal((n, variants, channels, size, size)) * std + mean
    return x.astype(np.float32)


def make_spec(n: int, *, channels=4, size=8, variants=1, classes=3, chunk=4, shard=16, quant=None):
    return StoreSpec(
        num_samples=n,
        latent_shape=(channels, size, size),
        quant=quant or calibrate(random_latents(64, channels, size, variants, seed=99)),
        vae=VaeInfo(id="tests/tiny-vae", scaling_factor=0.5, latent_channels=channels),
        classes=tuple(
            ClassInfo(index=i, id=f"n{i:08d}", name=f"class {i}") for i in range(classes)
        ),
        variants=("image", "hflip")[:variants],
        chunk_size=chunk,
        shard_size=shard,
        source={"kind": "test"},
    )


def write_store(path: Path, n: int = 40, *, failures=(), seed: int = 0, **spec_kw) -> Path:
    """Create a store and write all its shards; `failures` are sample indices left unwritten."""
    from latent_store import Failure

    spec = make_spec(n, **spec_kw)
    store = create_store(
        path, spec, [f"train/n{i % spec.num_classes:08d}/{i}.JPEG" for i in range(n)]
    )
    x = random_latents(n, spec.latent_shape[0], spec.latent_shape[1], len(spec.variants), seed)
    labels = (np.arange(n) % spec.num_classes).astype(np.int16)
    labels[list(failures)] = -1
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
    return path


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return write_store(tmp_path / "store.zarr")


@pytest.fixture
def python() -> str:
    return sys.executable


def make_tiny_vae(path: Path, *, latent_channels: int = 4, blocks: int = 4, seed: int = 0) -> Path:
    """Build a tiny diffusers AutoencoderKL (downsampling 2**(blocks-1)), save_pretrained to `path`."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(8,) * blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
    )
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A tiny 4-channel, 8x-downsampling AutoencoderKL saved in the standard diffusers folder format."""
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


# --- fixtures: encode (pipeline) ----------------------------------------------------------------


# --- fixtures: web ingestion --------------------------------------------------------------------


def make_web_images(folder: Path) -> dict[str, str]:
    """Images for the download tests: file name -> what it is. Every odd case img2dataset meets."""
    import io

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)

    def save(name: str, image: Image.Image, fmt: str) -> None:
        buf = io.BytesIO()
        image.save(buf, fmt)
        (folder / name).write_bytes(buf.getvalue())

    kinds = {}
    for i in range(8):  # plain RGB JPEGs of different sizes and colours
        save(f"rgb{i}.jpg", Image.new("RGB", (40 + 4 * i, 32), (30 * i, 100, 200 - 20 * i)), "JPEG")
        kinds[f"rgb{i}.jpg"] = "jpeg"
    save("cmyk.jpg", Image.new("CMYK", (36, 28), (10, 200, 30, 5)), "JPEG")
    save("png_named.jpg", Image.new("RGB", (30, 40), (250, 10, 10)), "PNG")
    save("rgba.png", Image.new("RGBA", (32, 32), (0, 255, 0, 128)), "PNG")
    (folder / "not_an_image.jpg").write_text("<html>this is not an image</html>")
    kinds.update({"cmyk.jpg": "cmyk", "png_named.jpg": "png", "rgba.png": "rgba"})
    kinds["not_an_image.jpg"] = "text"
    return kinds


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """(base URL, folder): `make_web_images` served over HTTP on 127.0.0.1, a free port, a thread."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    folder = tmp_path_factory.mktemp("www")
    make_web_images(folder)
    handler = functools.partial(QuietHandler, directory=str(folder))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
        server.shutdown()
        thread.join()


# --- fixtures: trainer --------------------------------------------------------------------------


# --- fixtures: sampler --------------------------------------------------------------------------


# --- fixtures: demo -----------------------------------------------------------------------------
