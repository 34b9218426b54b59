"""Shared fixtures: tiny stores written by the real writer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from testkit import (  # noqa: F401  (re-exported: tests import these from conftest)
    TINY_AUTOENCODERS,
    TINY_DIT,
    make_checkpoint,
    make_spec,
    make_tiny_dinov2,
    make_tiny_inception,
    make_tiny_vae,
    random_latents,
)
from testkit import write_random_store as write_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models run fastest single-threaded: on a 2-core machine, more threads only contend."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return write_store(tmp_path / "store.zarr")


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A tiny 4-channel, 8x-downsampling AutoencoderKL saved in the standard diffusers folder format."""
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture(scope="session")
def tiny_autoencoders(tmp_path_factory) -> dict[str, Path]:
    """A folder per tiny autoencoder of `testkit.TINY_AUTOENCODERS` (every family), saved once."""
    root = tmp_path_factory.mktemp("autoencoders")
    return {name: tiny.make(root / name) for name, tiny in TINY_AUTOENCODERS.items()}


@pytest.fixture
def safetensors_reads(monkeypatch) -> list[str]:
    """The tensor names read through `safetensors.safe_open` while the test runs, in order."""
    import safetensors

    read: list[str] = []
    real_safe_open = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kw):
            self.inner = real_safe_open(*args, **kw)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    return read


# --- fixtures: encode (pipeline) ----------------------------------------------------------------

WNIDS = ("n01440764", "n01443537", "n01484850")  # three ImageNet classes, in sorted order
BOMB_MAX_PIXELS = 500_000  # pass as --max-pixels so the 800x800 "bomb" is refused
# broken files in the generated train tree and the reason prefix each must be recorded with
BROKEN = {
    "n01440764/truncated.JPEG": "corrupt image",
    "n01440764/empty.JPEG": "empty file",
    "n01443537/error_page.JPEG": "not an image",
    "n01484850/bomb.png": "decompression bomb",
}
NOISE = (".DS_Store", "README.txt", "n01440764/.DS_Store", "n01443537/README.txt")


def smooth_image(width: int, height: int, seed: int):
    """An RGB image with smooth color gradients (JPEG-friendly), deterministic in `seed`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [
        np.sin(rng.uniform(2, 6) * x + rng.uniform(2, 6) * y + rng.uniform(0, 6)) for _ in range(3)
    ]
    return Image.fromarray(((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8), "RGB")


def _jpeg_bytes(img, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "JPEG"), **kw)
    return buf.getvalue()


def make_image_tree(root: Path, per_class: int = 4) -> dict[str, str]:
    """A tiny ImageNet train tree holding every file kind; returns {key: expected image mode}.

    Decodable: RGB JPEGs of 32-48 px, and a CMYK JPEG, a grayscale JPEG, a palette PNG with
    transparency, an RGBA PNG, a 16-bit PNG and a PNG named .JPEG. Broken: see BROKEN.
    Noise (ignored): see NOISE.
    """
    from PIL import Image

    modes = {}
    for c, wnid in enumerate(WNIDS):
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            w, h = 32 + (7 * j + 5 * c) % 17, 32 + (11 * j + 3 * c) % 17
            key = f"{wnid}/{wnid}_{j}.JPEG"
            (root / key).write_bytes(_jpeg_bytes(smooth_image(w, h, seed=10 * c + j), quality=90))
            modes[key] = "RGB"
    base = smooth_image(44, 36, seed=99)
    specials = {
        "n01440764/cmyk.JPEG": ("CMYK", _jpeg_bytes(base.convert("CMYK"))),
        "n01440764/gray.JPEG": ("L", _jpeg_bytes(base.convert("L"))),
        "n01443537/palette.png": ("P", _palette_png(base)),
        "n01443537/rgba.png": ("RGBA", _rgba_png(base)),
        "n01484850/deep16.png": ("I;16", _png16(base)),
        "n01484850/png_named.JPEG": ("RGB", _jpeg_bytes(base, format="PNG")),
    }
    for key, (mode, data) in specials.items():
        (root / key).write_bytes(data)
        modes[key] = mode
    good = _jpeg_bytes(base)
    (root / "n01440764/truncated.JPEG").write_bytes(good[: len(good) // 2])
    (root / "n01440764/empty.JPEG").write_bytes(b"")
    (root / "n01443537/error_page.JPEG").write_bytes(b"<html><body>404 Not Found</body></html>")
    bomb = Image.new("L", (800, 800))  # compresses to a few hundred bytes
    (root / "n01484850/bomb.png").write_bytes(_jpeg_bytes(bomb, format="PNG"))
    for name in NOISE:
        (root / name).write_bytes(b"\x00\x01 not an image")
    return modes


def _palette_png(img) -> bytes:
    p = img.convert("P", palette=1, colors=16)  # 1 = Image.Palette.ADAPTIVE
    return _jpeg_bytes(p, format="PNG", transparency=0)


def _rgba_png(img) -> bytes:
    from PIL import Image

    rgba = img.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, img.width, dtype=np.uint8), (img.height, 1))
    rgba.putalpha(Image.fromarray(alpha, "L"))
    return _jpeg_bytes(rgba, format="PNG")


def _png16(img) -> bytes:
    from PIL import Image

    wide = np.asarray(img.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    return _jpeg_bytes(Image.fromarray(wide), format="PNG")


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    """A generated ImageNet-layout train tree (see make_image_tree); read-only for tests."""
    root = tmp_path_factory.mktemp("imagenet") / "train"
    make_image_tree(root)
    return root


def store_contents(path: Path) -> dict:
    """Everything a store holds except the command line, for bit-identity comparisons."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs["latentdit"])
    attrs.pop("command")
    return {
        "attrs": attrs,
        **{name: group[name][:] for name in group.array_keys()},
    }


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder whose latest checkpoint is a tiny DiT (hidden 32, depth 2) trained 2 steps
    on a 4x8x8, 3-class store (`write_store`), through the real `trainer.train.train`."""

    from trainer.config import resolve_config
    from trainer.train import train

    root = tmp_path_factory.mktemp("tiny-run")
    options = {"store": str(write_store(root / "store.zarr", n=16)), "run": str(root / "run")}
    options.update(TINY_DIT, steps=2, batch_size=8, warmup_steps=0)
    return train(resolve_config(None, options)).run


# --- fixtures: sampler --------------------------------------------------------------------------


# --- fixtures: demo -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A tiny demo image set (2 train + 4 val images per class) in the ImageNet layout."""
    from demo.data import DemoDataConfig, make_demo_data

    out = tmp_path_factory.mktemp("demo") / "data"
    return make_demo_data(DemoDataConfig(out=out, train_per_class=2, val_per_class=4))


# --- fixtures: evaluation -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_inception(tmp_path_factory) -> Path:
    return make_tiny_inception(tmp_path_factory.mktemp("inception") / "tiny.pt")


@pytest.fixture(scope="session")
def tiny_inception_logits(tmp_path_factory) -> Path:
    return make_tiny_inception(tmp_path_factory.mktemp("inception") / "tiny-logits.pt", logits=True)


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A tiny transformers Dinov2Model saved with save_pretrained (loaded by folder)."""
    return make_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny-dinov2")


# --- fixtures: training runs from the command line ----------------------------------------------

TINY_TRAIN = [
    "--model",
    "DiT-S/2",
    "--hidden-size",
    "32",
    "--depth",
    "2",
    "--num-heads",
    "2",
    "--warmup-steps",
    "0",
    "--batch-size",
    "8",
    "--log-every",
    "1",
]


def train_cli(*args) -> str:
    """`latentdit train ARGS` in this process (CliRunner); its stdout, after checking exit 0."""
    from typer.testing import CliRunner

    from cli import app

    r = CliRunner().invoke(app, ["train", *map(str, args)])
    assert r.exit_code == 0, r.output
    return r.stdout
