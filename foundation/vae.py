"""Resolve and load a diffusers AutoencoderKL: whole (to encode) or its decoder only (to sample).

    vae = load_autoencoder(VaeConfig(id="stabilityai/sd-vae-ft-ema", dtype="bf16", device="cuda"))
    decoder = load_vae_decoder("stabilityai/sd-vae-ft-ema")   # the encoder's weights stay on disk
    images = decode_latents(decoder, raw_latents)             # uint8 (B, H, W, 3)

Ids are a local folder (saved with `save_pretrained`), a pipeline folder holding `vae/`, or a hub
id (its cache, revision and HF_HUB_OFFLINE honoured). Latent factors (`scaling_factor`,
`shift_factor`) are read from the VAE's config, never typed in.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from foundation.errors import VaeLoadError
from foundation.precision import NAMES as PRECISION_NAMES
from foundation.precision import torch_dtype

if TYPE_CHECKING:  # torch loads with the first model, so VaeConfig imports cheaply
    import torch

log = logging.getLogger(__name__)

VAE_CLASS = "AutoencoderKL"
VAE_SUBFOLDER = "vae"  # where full pipeline repos keep their VAE
DECODER_PREFIXES = ("decoder.", "post_quant_conv.")
DROPPED_MODULES = ("encoder", "quant_conv")


@dataclass(frozen=True, kw_only=True)
class VaeConfig:
    """Which VAE to load and how to run it."""

    id: str
    """Hub id (e.g. stabilityai/sd-vae-ft-ema) or a local folder saved with save_pretrained."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); None for the default branch."""
    dtype: str = "fp32"
    """Compute dtype: fp32, fp16 or bf16."""
    device: str = "cpu"
    """Torch device to run on."""
    channels_last: bool = True
    """Use the channels_last memory format (faster convolutions on GPUs)."""
    compile: bool = False
    """torch.compile the encoder."""

    def __post_init__(self) -> None:
        if self.dtype not in PRECISION_NAMES:
            raise VaeLoadError(f"dtype {self.dtype!r} is not one of {', '.join(PRECISION_NAMES)}")


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for local files only (no hub requests)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_vae_id(vae_id: str) -> tuple[str, str | None]:
    """(path or hub id, subfolder); a local pipeline folder's VAE lives in its `vae/`."""
    local = Path(vae_id).expanduser()
    if local.exists():
        if not local.is_dir():
            raise VaeLoadError(f"--vae {vae_id}: a file, not a VAE folder (config.json + weights)")
        if (local / VAE_SUBFOLDER / "config.json").is_file() and not (
            local / "config.json"
        ).is_file():
            return str(local.resolve()), VAE_SUBFOLDER
        return str(local.resolve()), None
    if vae_id.startswith(("/", ".", "~")) or vae_id.count("/") > 1:  # a path, not "org/name"
        raise VaeLoadError(f"--vae {vae_id}: no such folder; pass a VAE folder or a hub id")
    return vae_id, None


def read_vae_config(path: str, subfolder: str | None, **kwargs) -> tuple[dict, str | None]:
    """The VAE's config and the subfolder holding it (hub pipeline repos keep it in `vae/`)."""
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.load_config(path, subfolder=subfolder, **kwargs), subfolder
    except OSError as first:
        if subfolder is not None or Path(path).exists():
            raise
        try:
            config = AutoencoderKL.load_config(path, subfolder=VAE_SUBFOLDER, **kwargs)
        except OSError:
            raise first from None
        return config, VAE_SUBFOLDER


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _from_pretrained(cfg: VaeConfig, path: str, subfolder: str | None):
    """AutoencoderKL.from_pretrained, with every way it fails turned into one VaeLoadError."""
    from diffusers import AutoencoderKL

    kwargs = dict(revision=cfg.revision, local_files_only=hub_offline())
    # without accelerate, diffusers warns on every load unless asked for the plain path
    low_mem = importlib.util.find_spec("accelerate") is not None
    try:
        config, subfolder = read_vae_config(path, subfolder, **kwargs)
        if config.get("_class_name", VAE_CLASS) != VAE_CLASS:
            raise VaeLoadError(
                f"--vae {cfg.id}: a {config['_class_name']}, not an {VAE_CLASS}; pass a VAE folder"
            )
        return AutoencoderKL.from_pretrained(
            path,
            subfolder=subfolder,
            torch_dtype=torch_dtype(cfg.dtype),
            low_cpu_mem_usage=low_mem,
            **kwargs,
        )
    except VaeLoadError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as e:
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the HF cache: download it first or pass a "
            "local folder"
            if hub_offline() and not Path(path).exists()
            else "need a diffusers AutoencoderKL folder with config.json and weights, or a hub id"
        )
        raise VaeLoadError(f"cannot load VAE {cfg.id!r}: {_first_line(e)} ({hint})") from None


def load_autoencoder(cfg: VaeConfig):
    """The whole AutoencoderKL in eval mode on cfg.device (channels_last, compiled as asked)."""
    import torch

    path, subfolder = resolve_vae_id(cfg.id)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*local_dir_use_symlinks", category=UserWarning)
        vae = _from_pretrained(cfg, path, subfolder)
    vae = vae.to(cfg.device).eval().requires_grad_(False)
    if cfg.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    if cfg.compile:
        vae.encoder = torch.compile(vae.encoder)
    return vae


def resolve_vae_files(vae_id: str, revision: str | None = None) -> tuple[dict, Path]:
    """(config, safetensors weights path) of a VAE folder, pipeline folder or hub id."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    path, subfolder = resolve_vae_id(vae_id)
    kwargs = {"revision": revision, "local_files_only": hub_offline()}
    try:
        with warnings.catch_warnings():
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
        raise VaeLoadError(
            f"--vae {vae_id}: cannot load its decoder ({_first_line(e)}); need a diffusers "
            "AutoencoderKL folder with config.json and safetensors weights, or a hub id (cached "
            "when offline)"
        ) from None
    if config.get("_class_name", VAE_CLASS) != VAE_CLASS:
        raise VaeLoadError(f"--vae {vae_id}: a {config['_class_name']}, not an {VAE_CLASS}")
    return config, weights


def load_vae_decoder(
    vae_id: str, *, revision: str | None = None, device: str | torch.device = "cpu"
):
    """An AutoencoderKL holding only its decoder and post_quant_conv (encoder modules are None).

    The model is built on the meta device and only the `decoder.*` and `post_quant_conv.*`
    tensors are read from the safetensors file: the encoder's weights never reach memory.
    """
    import torch
    from diffusers import AutoencoderKL
    from safetensors import safe_open

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
        raise VaeLoadError(
            f"--vae {vae_id}: {weights_path.name} does not fit its config "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    vae.load_state_dict(state, strict=True, assign=True)
    log.info("loaded the VAE decoder of %s (%d tensors)", vae_id, len(state))
    return vae.eval().requires_grad_(False)


def downsampling(vae) -> int:
    """The VAE's spatial downsampling factor (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decode_latents(vae, latents: torch.Tensor, *, to_cpu: bool = True) -> torch.Tensor:
    """Decode raw latents (B, C, h, w) to uint8 (B, H, W, 3) images on the CPU (or left on the
    VAE's device, with `to_cpu=False`, for a copy that does not wait)."""
    import torch

    with torch.inference_mode():
        x = vae.decode(latents.to(vae.device, vae.dtype)).sample.float()
        images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        return images.cpu() if to_cpu else images
