"""Load only a VAE's decoder, and turn a model's normalized latents into 8-bit images.

    decoder = LatentDecoder.load("stabilityai/sd-vae-ft-ema", normalization=meta["normalization"])
    images = decoder(z)  # uint8 (B, H, W, 3)

The AutoencoderKL is built on the meta device, its encoder and quant_conv are dropped, and only
the `decoder.*` and `post_quant_conv.*` tensors are read from the safetensors file: the encoder's
weights never reach memory. Hub ids resolve through huggingface_hub (cache, revision and
HF_HUB_OFFLINE honoured), like `from_pretrained` does.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from safetensors import safe_open
from torch import Tensor

from pipeline.vae import decode_latents, hub_offline, read_vae_config, resolve_vae_id
from sampler.errors import SamplerError, VaeMismatchError
from trainer.normalization import LatentNormalization

log = logging.getLogger(__name__)

DECODER_PREFIXES = ("decoder.", "post_quant_conv.")
DROPPED_MODULES = ("encoder", "quant_conv")


def resolve_vae_files(vae_id: str, revision: str | None = None) -> tuple[dict, Path]:
    """(config, safetensors weights path) of a VAE folder, pipeline folder or hub id.

    Ids resolve as the encoder resolves them (`pipeline.vae`): a local folder or its `vae/`, a
    hub id or its `vae/` subfolder; the hub cache, revision and HF_HUB_OFFLINE are honoured.
    """
    path, subfolder = resolve_vae_id(vae_id)
    kwargs = {"revision": revision, "local_files_only": hub_offline()}
    try:
        with warnings.catch_warnings():
            # diffusers 0.42 passes a deprecated argument to huggingface_hub on every hub lookup
            warnings.filterwarnings("ignore", ".*local_dir_use_symlinks", category=UserWarning)
            config, subfolder = read_vae_config(path, subfolder, **kwargs)
        weights = Path(path, subfolder or "", SAFETENSORS_WEIGHTS_NAME)
        if not Path(path).is_dir():
            weights = Path(
                hf_hub_download(path, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **kwargs)
            )
        elif not weights.is_file():
            raise OSError(f"no {SAFETENSORS_WEIGHTS_NAME} in {weights.parent}")
    except (OSError, ValueError, HfHubHTTPError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SamplerError(
            f"--vae {vae_id}: cannot load its decoder ({reason}); need a diffusers AutoencoderKL "
            "folder with config.json and safetensors weights, or a hub id (cached when offline)"
        ) from None
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise SamplerError(f"--vae {vae_id}: a {config['_class_name']}, not an AutoencoderKL")
    return config, weights


def load_vae_decoder(
    vae_id: str, *, revision: str | None = None, device: str | torch.device = "cpu"
) -> AutoencoderKL:
    """An AutoencoderKL holding only its decoder and post_quant_conv (encoder modules are None)."""
    config, weights_path = resolve_vae_files(vae_id, revision)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    for name in DROPPED_MODULES:
        setattr(vae, name, None)
    wanted = set(vae.state_dict())
    with safe_open(weights_path, framework="pt", device=str(device)) as f:
        # read only decoder tensors; the encoder's stay on disk
        keys = [k for k in f.keys() if k.startswith(DECODER_PREFIXES)]  # noqa: SIM118
        state = {k: f.get_tensor(k).float() for k in keys}
    state = vae._fix_state_dict_keys_on_load(state)  # diffusers' rename of pre-0.14 attention keys
    missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or extra:
        raise SamplerError(
            f"--vae {vae_id}: {weights_path.name} does not fit its config "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    vae.load_state_dict(state, strict=True, assign=True)
    log.info("loaded the VAE decoder of %s (%d tensors)", vae_id, len(state))
    return vae.eval().requires_grad_(False)


def check_vae_fits(meta: Mapping[str, Any], vae: AutoencoderKL, vae_id: str) -> None:
    """Refuse a VAE whose latents differ from the checkpoint's, naming both values."""
    recorded = meta.get("vae", {})
    norm = meta["normalization"]
    checks = [
        ("latent channels", meta["latent_shape"][0], vae.config.latent_channels),
        ("normalization mean length", len(norm["mean"]), vae.config.latent_channels),
        ("normalization std length", len(norm["std"]), vae.config.latent_channels),
    ] + [
        (key, recorded[key], mine)
        for key, mine in (
            ("scaling_factor", vae.config.scaling_factor),
            ("shift_factor", vae.config.shift_factor),
            ("downsampling", _downsampling(vae)),
        )
        if key in recorded
    ]
    for what, ckpt, mine in checks:
        if not _same(ckpt, mine):
            raise VaeMismatchError(
                f"the checkpoint does not fit VAE {vae_id}: {what} {ckpt} (checkpoint, VAE "
                f"{recorded.get('id')}) vs {mine} (VAE {vae_id}); pass the VAE it was trained "
                "with as --vae"
            )


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b


def _downsampling(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


class LatentDecoder:
    """Invert the checkpoint's latent normalization and decode with the VAE decoder."""

    def __init__(self, vae: AutoencoderKL, normalization: Mapping[str, Any]) -> None:
        self.vae = vae
        self.normalization = LatentNormalization.from_meta(dict(normalization))
        self.downsampling = _downsampling(vae)

    @classmethod
    def load(
        cls,
        vae_id: str,
        meta: Mapping[str, Any],
        *,
        revision: str | None = None,
        device: str | torch.device = "cpu",
    ) -> LatentDecoder:
        """Load the decoder of `vae_id` and check it against the checkpoint's `meta`."""
        vae = load_vae_decoder(vae_id, revision=revision, device=device)
        check_vae_fits(meta, vae, vae_id)
        return cls(vae, meta["normalization"])

    def __call__(self, z: Tensor) -> Tensor:
        """uint8 images (B, H, W, 3) on the CPU from normalized latents z (B, C, h, w)."""
        return decode_latents(self.vae, self.normalization.denormalize(z.float()))
