"""DINOv2 features for FD_DINOv2, as EDM2 computes them (NVlabs/edm2 `calculate_metrics.py`).

    net = load_dinov2("facebook/dinov2-large")     # hub id: the HF cache (HF_HUB_OFFLINE=1 works)
    net = load_dinov2("models/dinov2-large")       # a folder written by save_pretrained
    net.features(images)["dinov2"]                 # uint8 (N, H, W, 3) -> float32 (N, 1024)

EDM2's `DINOv2Detector` (its default resize_mode "torch"), rule for rule:
1. uint8 NCHW images cast to float32 in [0, 255] and resized to 224 x 224 by
   `F.interpolate(mode="bicubic", antialias=True)`, without clamping the overshoot;
2. divided by 255, minus the ImageNet mean (0.485, 0.456, 0.406), over the std (0.229, 0.224,
   0.225);
3. DINOv2 ViT-L/14 (torch.hub `facebookresearch/dinov2` `dinov2_vitl14`), whose output is the
   final LayerNorm's class token (`x_norm_clstoken`; its head is the identity): transformers'
   `Dinov2Model` gives the same tensor as `pooler_output`.
The model was trained at 518 px (37 x 37 patches); at 224 px (16 x 16) the position embeddings are
resized as the torch.hub model resizes them: bicubic with scale factor (16 + 0.1) / 37 (its
`interpolate_offset`, no antialiasing). transformers' Dinov2 resizes to the size 16 x 16 instead,
which samples other positions (max difference ~1e-2 on real weights' embeddings), so that one method
is replaced here (`_hub_position_embeddings`). The network runs in float32 with TF32 off; EDM2
leaves PyTorch's defaults (cuDNN TF32 on for the patch convolution on Ampere and later GPUs).
"""

from __future__ import annotations

import logging
import math
import types

import numpy as np
import torch
import xxhash
from torch import Tensor, nn

from evaluation.config import DEFAULT_DINOV2
from evaluation.errors import NetworkError

log = logging.getLogger(__name__)

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATE_OFFSET = 0.1  # the torch.hub model's `interpolate_offset`
NAME = "DINOv2 class token (EDM2 FD_DINOv2)"


def _hub_position_embeddings(self, embeddings: Tensor, height: int, width: int) -> Tensor:
    """Dinov2Embeddings.interpolate_pos_encoding as facebookresearch/dinov2's
    `DinoVisionTransformer.interpolate_pos_encoding` computes it (scale factor with offset 0.1)."""
    pos = self.position_embeddings
    patches, positions = embeddings.shape[1] - 1, pos.shape[1] - 1
    if patches == positions and height == width:
        return pos
    side = int(math.sqrt(positions))
    patch = self.patch_embeddings.patch_size
    h0, w0 = height // patch[0], width // patch[1]
    grid = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(
        grid,
        scale_factor=((h0 + INTERPOLATE_OFFSET) / side, (w0 + INTERPOLATE_OFFSET) / side),
        mode="bicubic",
        antialias=False,
    )
    if grid.shape[-2:] != (h0, w0):
        raise NetworkError(f"DINOv2 position embeddings resized to {grid.shape[-2:]}, not {h0, w0}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
    return torch.cat([pos[:, :1].float(), grid], dim=1).to(pos.dtype)


def weights_digest(model: nn.Module) -> str:
    """xxh3-128 of the state dict (names, dtypes, shapes and bytes, in order): the weights' identity,
    the same for a hub copy and a folder holding the same tensors."""
    h = xxhash.xxh3_128()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(np.ascontiguousarray(t.detach().cpu().float().numpy()).tobytes())
    return h.hexdigest()


class DinoV2Features(nn.Module):
    """EDM2's DINOv2 detector around a transformers `Dinov2Model` (see the module docstring)."""

    space = "dinov2"  # evaluation.spaces.DINOV2

    def __init__(self, model: nn.Module, *, source: str, revision: str | None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        embeddings = self.model.embeddings
        embeddings.interpolate_pos_encoding = types.MethodType(_hub_position_embeddings, embeddings)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.source, self.revision = source, revision
        self.digest = weights_digest(self.model)

    @property
    def identity(self) -> dict[str, str | None]:
        """What a stats file records of this network; `fingerprint` (the weights) must match."""
        return {
            "name": NAME,
            "source": self.source,
            "revision": self.revision,
            "weights_xxh3_128": self.digest,
            "fingerprint": self.digest,
        }

    def network_input(self, images: Tensor) -> Tensor:
        """float32 (N, 3, 224, 224), normalized, from uint8 images (N, H, W, 3)."""
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        x = nn.functional.interpolate(
            x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True
        )
        return (x / 255 - self.mean) / self.std

    @torch.no_grad()
    def features(self, images: Tensor) -> dict[str, Tensor]:
        """{"dinov2": the class token after the final LayerNorm, float32 (N, hidden)}."""
        return {"dinov2": self.model(pixel_values=self.network_input(images)).pooler_output}


def load_dinov2(source: str = DEFAULT_DINOV2, *, device="cpu") -> DinoV2Features:
    """DINOv2 from a hub id or a save_pretrained folder, as EDM2's detector (float32, eval)."""
    from transformers import Dinov2Model

    try:
        model = Dinov2Model.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError, TypeError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise NetworkError(
            f"--dinov2 {source}: cannot load a transformers Dinov2Model ({reason}); give a hub "
            f"id in the HF cache (fetch {DEFAULT_DINOV2} where the hub is reachable; "
            "HF_HUB_OFFLINE=1 then reads the cache) or a folder written by save_pretrained"
        ) from None
    revision = getattr(model.config, "_commit_hash", None)
    net = DinoV2Features(model, source=str(source), revision=revision).to(device)
    log.info("DINOv2 %s (revision %s, weights %s)", source, revision, net.digest[:12])
    return net
