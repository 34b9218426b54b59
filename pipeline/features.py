"""Vision encoders whose tokens a store keeps beside the latents: REPA's alignment targets.

    encoder = load_feature_encoder(FeaturesConfig(encoder="facebook/dinov2-base"), latent_side=32)
    patch, cls = encoder(pixels)     # uint8 (b, 3, H, W) -> float32 (b, D, T), (b, D, 1)

Two kinds of encoder, one output:
- A `transformers` vision model by hub id or folder whose config's `model_type` is one of
  ENCODER_KINDS (DINOv2, DINOv2 with registers, ViT, ViT-MAE without masking), preprocessed as
  REPA's train.py `preprocess_raw_image` does for DINOv2: x / 255, normalized with the model's
  image processor mean and std (ImageNet's, REPA's constants, when it has none), then resized
  bicubic to G x patch pixels (224 for the grid G = 16 of DINOv2's 14-px patches; REPA's
  224 * (resolution // 256)). Its position embeddings are resampled once to G x G as REPA's
  `load_encoders` does (timm's `resample_abs_pos_embed`: bicubic, antialiased, in float32), so
  that transformers' own per-call interpolation (antialiased for DINOv2 with registers, not for
  DINOv2) never runs.
- The encoder of a diffusers AutoencoderRAE, loaded through `foundation.autoencoders` and run as
  the RAE runs it: images in [0, 1], resized bicubic to its `encoder_input_size`, normalized with
  its `encoder_norm_mean`/`encoder_norm_std`; its grid is its own.

The tokens are the model's `last_hidden_state` (after its final LayerNorm: REPA's
`x_norm_patchtokens` and `x_norm_clstoken`), channel first: the patch tokens (D, T) after the
class and register tokens, T = G * G in row-major order, and the class token (D, 1).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from foundation.autoencoders.loading import VaeConfig, hub_offline, load_autoencoder
from foundation.errors import LatentditError, VaeLoadError
from foundation.precision import torch_dtype
from latent_store.checksums import shard_checksum
from pipeline.features_config import FeaturesConfig

log = logging.getLogger(__name__)

# timm's IMAGENET_DEFAULT_MEAN / _STD, which REPA normalizes DINOv2's input with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIXEL_MAX = 255.0
RAE = "AutoencoderRAE"


class FeaturesError(LatentditError):
    """--features names something latentdit cannot take features from."""


@dataclass(frozen=True)
class EncoderKind:
    """What latentdit needs to know of one transformers vision model type."""

    registers: str | None = None
    """The config field holding the number of register tokens after the class token."""
    interpolate_kwarg: bool = False
    """Whether forward takes `interpolate_pos_encoding` (else it always interpolates)."""
    unmasked: bool = False
    """ViT-MAE: forward takes a `noise` that orders tokens; no masking is allowed."""
    head: tuple[str, ...] = ("layernorm.", "pooler.")
    """State-dict prefixes after the last block (left out when two encoders' trunks are compared)."""


ENCODER_KINDS = {
    "dinov2": EncoderKind(),
    "dinov2_with_registers": EncoderKind(registers="num_register_tokens"),
    "vit": EncoderKind(interpolate_kwarg=True),
    "vit_mae": EncoderKind(interpolate_kwarg=True, unmasked=True),
}
RAE_KINDS = {"dinov2": "dinov2_with_registers", "mae": "vit_mae"}  # RAE's encoder_type -> kind


class FeatureEncoder(nn.Module):
    """A vision encoder and its preprocessing: uint8 pixels to channel-first tokens."""

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: EncoderKind,
        grid: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        resize_first: bool,
        facts: dict[str, Any],
    ) -> None:
        super().__init__()
        self.model, self.kind, self.grid, self.resize_first = model, kind, grid, resize_first
        config = model.config
        self.prefix = 1 + (int(getattr(config, kind.registers)) if kind.registers else 0)
        self.patch = int(config.patch_size)
        self.hidden = int(config.hidden_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.facts = facts

    @property
    def input_size(self) -> int:
        return self.grid * self.patch

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (b, 3, H, W) to the model's input, float32 math then the model's dtype: REPA's
        order (normalize, then resize) or the RAE's (resize, then normalize)."""
        x = pixels.float() / PIXEL_MAX
        size = (self.input_size, self.input_size)
        if self.resize_first:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        if not self.resize_first:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        return x.to(self.model.dtype)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (b, 3, H, W) -> float32 patch tokens (b, D, T) and class tokens (b, D, 1)."""
        x = self.model_input(pixels)
        kwargs: dict[str, Any] = (
            {"interpolate_pos_encoding": True} if self.kind.interpolate_kwarg else {}
        )
        if self.kind.unmasked:  # ascending noise keeps every token in place (mask_ratio 0)
            order = torch.arange(self.tokens, device=x.device, dtype=x.dtype)
            kwargs["noise"] = order.expand(len(x), -1)
        hidden = self.model(pixel_values=x, **kwargs).last_hidden_state.float()
        patch = hidden[:, self.prefix :]
        assert patch.shape[1] == self.tokens, f"{patch.shape[1]} tokens, expected {self.tokens}"
        return patch.transpose(1, 2), hidden[:, :1].transpose(1, 2)


def state_digest(model: nn.Module, skip: tuple[str, ...] = ()) -> str:
    """A checksum of a model's weights (keys sorted; those starting with `skip` left out), over
    their values in float32: the same weights give the same digest whatever the file or id."""
    state = model.state_dict()
    values = {
        k: state[k].detach().float().cpu().numpy() for k in sorted(state) if not k.startswith(skip)
    }
    return shard_checksum(values)


def resample_positions(model: nn.Module, grid: int) -> bool:
    """Resample the model's position embeddings (1, 1 + g*g, D) to grid x grid in place, the
    class position kept: bicubic with antialiasing in float32, as REPA (timm's
    `resample_abs_pos_embed`). Returns whether anything changed."""
    table = model.embeddings.position_embeddings
    positions = table.shape[1] - 1
    side = round(positions**0.5)
    if side == grid:
        return False
    patches = table[:, 1:].detach().float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True)
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(table.dtype)
    model.embeddings.position_embeddings = nn.Parameter(
        torch.cat([table[:, :1].detach(), resized], dim=1), requires_grad=False
    )
    return True


def _resolve(encoder: str) -> str:
    """A local folder's absolute path, or a hub id; one line for a path that does not exist."""
    local = Path(encoder).expanduser()
    if local.exists():
        if not local.is_dir():
            raise FeaturesError(f"--features {encoder}: a file, not a model folder (config.json)")
        return str(local.resolve())
    if encoder.startswith(("/", ".", "~")) or encoder.count("/") > 1:
        raise FeaturesError(
            f"--features {encoder}: no such folder; pass a model folder or a hub id"
        )
    return encoder


def read_encoder_config(encoder: str, revision: str | None = None) -> tuple[str, dict]:
    """(path or hub id, its config.json as a dict), read with transformers' hub client."""
    from transformers import PretrainedConfig

    path = _resolve(encoder)
    try:
        config, _ = PretrainedConfig.get_config_dict(
            path, revision=revision, local_files_only=hub_offline()
        )
    except (OSError, ValueError) as e:
        offline = (
            " (HF_HUB_OFFLINE is set: download it first or pass a folder)" if hub_offline() else ""
        )
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FeaturesError(
            f"--features {encoder}: cannot read its config ({first}){offline}"
        ) from None
    return path, config


def load_feature_encoder(cfg: FeaturesConfig, *, latent_side: int) -> FeatureEncoder:
    """The encoder `cfg` names, in eval mode on cfg.device in cfg.dtype; one line (FeaturesError)
    for a model that is not a vision encoder latentdit reads, or a grid it cannot take."""
    path, config = read_encoder_config(cfg.encoder, cfg.revision)
    if config.get("_class_name") == RAE:
        encoder = _load_rae(cfg, path, config)
    elif "_class_name" in config:
        raise FeaturesError(
            f"--features {cfg.encoder}: a diffusers {config['_class_name']}, not a vision encoder; "
            f"{_supported()}"
        )
    else:
        encoder = _load_transformers(cfg, path, config, cfg.grid_for(latent_side))
    encoder.requires_grad_(False).eval().to(cfg.device)
    log.info("features encoder %s: %s", cfg.encoder, encoder.facts)
    return encoder


def _supported() -> str:
    kinds = ", ".join(ENCODER_KINDS)
    return f"use a transformers vision model ({kinds}; e.g. facebook/dinov2-base) or an {RAE}"


def _load_transformers(cfg: FeaturesConfig, path: str, config: dict, grid: int) -> FeatureEncoder:
    from transformers import AutoModel

    model_type = config.get("model_type")
    kind = ENCODER_KINDS.get(model_type)
    if kind is None:
        made = f"a {model_type} model" if model_type else "a model without a model_type"
        archs = ", ".join(config.get("architectures") or [])
        raise FeaturesError(
            f"--features {cfg.encoder}: {made}{f' ({archs})' if archs else ''}, not a vision "
            f"encoder latentdit reads; {_supported()}"
        )
    if kind.unmasked and float(config.get("mask_ratio", 0.0)) != 0.0:
        raise FeaturesError(
            f"--features {cfg.encoder}: a ViT-MAE with mask_ratio {config['mask_ratio']} drops "
            "tokens at random; save it with mask_ratio 0"
        )
    try:
        with _quiet_loading():
            model = AutoModel.from_pretrained(
                path, revision=cfg.revision, dtype=torch.float32, local_files_only=hub_offline()
            )
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FeaturesError(f"--features {cfg.encoder}: cannot load it ({first})") from None
    mean, std = _image_stats(path, cfg.revision)
    facts = _facts(cfg, path, model, grid)
    resampled = resample_positions(model, grid)
    facts["preprocess"] = {
        "pixels": "x / 255",
        "mean": list(mean),
        "std": list(std),
        "order": "normalize, then resize (REPA)",
        "resize": f"bicubic to {grid * int(model.config.patch_size)} px",
        "positions": f"resampled to {grid}x{grid} (bicubic, antialiased; REPA)"
        if resampled
        else "as trained",
    }
    model.to(torch_dtype(cfg.dtype))
    return FeatureEncoder(
        model, kind=kind, grid=grid, mean=mean, std=std, resize_first=False, facts=facts
    )


@contextlib.contextmanager
def _quiet_loading():
    """transformers' weight-loading progress bar off (the encode job has its own), then as it was."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load_rae(cfg: FeaturesConfig, path: str, config: dict) -> FeatureEncoder:
    try:
        ae = load_autoencoder(
            VaeConfig(
                id=path, revision=cfg.revision, dtype="fp32", device="cpu", channels_last=False
            )
        )
    except VaeLoadError as e:
        raise FeaturesError(str(e).replace("--vae", "--features", 1)) from None
    kind_name = RAE_KINDS.get(ae.config.get("encoder_type", "dinov2"))
    if kind_name is None:
        raise FeaturesError(
            f"--features {cfg.encoder}: an {RAE} with a {ae.config.get('encoder_type')} encoder, "
            f"which has no class token; use one with a dinov2 or mae encoder"
        )
    if cfg.grid is not None and cfg.grid != ae.grid:
        raise FeaturesError(
            f"--features-grid {cfg.grid}: {RAE} {cfg.encoder} sees {ae.config['encoder_input_size']} "
            f"px as a {ae.grid}x{ae.grid} grid; leave --features-grid out or give {ae.grid}"
        )
    rae = ae.model
    model = rae.encoder
    mean = tuple(float(v) for v in rae.encoder_mean.flatten())
    std = tuple(float(v) for v in rae.encoder_std.flatten())
    facts = _facts(cfg, path, model, ae.grid)
    facts["class"] = f"{RAE}.encoder ({type(model).__name__})"
    facts["preprocess"] = {
        "pixels": "x / 255",
        "mean": list(mean),
        "std": list(std),
        "order": "resize, then normalize (the RAE's own)",
        "resize": f"bicubic to {int(ae.config['encoder_input_size'])} px",
        "positions": "interpolated by the model (the RAE's own)",
    }
    model.to(torch_dtype(cfg.dtype))
    kind = ENCODER_KINDS[kind_name]
    return FeatureEncoder(
        model, kind=kind, grid=ae.grid, mean=mean, std=std, resize_first=True, facts=facts
    )


def _facts(cfg: FeaturesConfig, path: str, model: nn.Module, grid: int) -> dict[str, Any]:
    """What the store records of the encoder (its weights by digest, before any resampling)."""
    return {
        "encoder": path,
        "revision": cfg.revision,
        "class": type(model).__name__,
        "model_type": model.config.model_type,
        "weights": state_digest(model),
        "hidden_size": int(model.config.hidden_size),
        "patch_size": int(model.config.patch_size),
        "grid": [grid, grid],
        "output": "last_hidden_state (after the final LayerNorm)",
    }


def _image_stats(path: str, revision: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's image processor mean and std; ImageNet's (REPA's) when it has none."""
    from transformers import ImageProcessingMixin

    try:
        d, _ = ImageProcessingMixin.get_image_processor_dict(
            path, revision=revision, local_files_only=hub_offline()
        )
    except (OSError, ValueError):
        d = {}
    mean, std = d.get("image_mean"), d.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def trunk_digest(encoder: FeatureEncoder | nn.Module, kind: EncoderKind) -> str:
    """The digest of an encoder's weights before its head (final LayerNorm, pooler), as used now."""
    model = encoder.model if isinstance(encoder, FeatureEncoder) else encoder
    return state_digest(model, skip=(*kind.head, "embeddings.position_embeddings"))


__all__ = [
    "ENCODER_KINDS",
    "FeatureEncoder",
    "FeaturesError",
    "load_feature_encoder",
    "read_encoder_config",
    "resample_positions",
    "state_digest",
    "trunk_digest",
]
