"""Load a diffusers AutoencoderKL and encode uint8 crops into posterior latents.

Stored latents are the raw posterior (before `scaling_factor` / `shift_factor`); the factors are
read from the VAE's config and recorded in the store, never typed in.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from latent_store import LatentditError, VaeInfo

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VAE_CLASS = "AutoencoderKL"
VAE_SUBFOLDER = "vae"  # where full pipeline repos keep their VAE


class VaeLoadError(LatentditError):
    """The VAE cannot be loaded: missing weights, not a VAE, offline without a cache."""


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
        if self.dtype not in DTYPES:
            raise VaeLoadError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")


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
            torch_dtype=DTYPES[cfg.dtype],
            low_cpu_mem_usage=low_mem,
            **kwargs,
        )
    except VaeLoadError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the HF cache: download it first or pass a "
            "local folder"
            if hub_offline() and not Path(path).exists()
            else "need a diffusers AutoencoderKL folder with config.json and weights, or a hub id"
        )
        raise VaeLoadError(f"cannot load VAE {cfg.id!r}: {reason} ({hint})") from None


def load_vae(cfg: VaeConfig):
    """Load the AutoencoderKL in eval mode on cfg.device; returns (vae, VaeInfo)."""
    path, subfolder = resolve_vae_id(cfg.id)
    with warnings.catch_warnings():
        # diffusers 0.42 passes a deprecated argument to huggingface_hub on every hub lookup
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
        vae = _from_pretrained(cfg, path, subfolder)
    vae = vae.to(cfg.device).eval().requires_grad_(False)
    if cfg.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    if cfg.compile:
        vae.encoder = torch.compile(vae.encoder)
    return vae, vae_info(vae, path, cfg)


def vae_info(vae, vae_id: str, cfg: VaeConfig) -> VaeInfo:
    """Provenance and latent factors of a loaded VAE, from its config."""
    c = vae.config
    return VaeInfo(
        id=vae_id,
        revision=cfg.revision,
        cls=type(vae).__name__,
        scaling_factor=float(c.scaling_factor),
        shift_factor=None if c.get("shift_factor") is None else float(c.shift_factor),
        latent_channels=int(c.latent_channels),
        downsampling=2 ** (len(c.block_out_channels) - 1),
    )


def to_model_input(crops: torch.Tensor, vae) -> torch.Tensor:
    """uint8 (B, H, W, 3) crops to the VAE's input: (B, 3, H, W) in [-1, 1], its dtype."""
    x = crops.to(vae.device, non_blocking=True).permute(0, 3, 1, 2)
    x = x.to(vae.dtype).div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last)


def key_seed(key: str, variant: int) -> int:
    """A 63-bit seed from a sample's key and variant, the same on every rank and every run."""
    digest = hashlib.blake2b(f"{variant}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.inference_mode()
def encode_posterior(
    vae, crops: torch.Tensor, *, posterior: str, seeds: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode uint8 (B, H, W, 3) crops; returns float32 latents (B, C, h, w) and log std or None.

    posterior: "mean" (the posterior mean), "sample" (mean + std * noise, noise drawn on the CPU
    from `seeds`, one per crop, so it is the same on any device and split), or "moments" (the mean,
    plus the log std as the second output).
    """
    dist = vae.encode(to_model_input(crops, vae)).latent_dist
    mean = dist.mean.float()
    if posterior == "mean":
        return mean, None
    logstd = 0.5 * dist.logvar.float()  # diffusers clamps logvar to [-30, 20]
    if posterior == "moments":
        return mean, logstd
    assert seeds is not None and len(seeds) == len(mean), "sample mode needs one seed per crop"
    noise = torch.stack(
        [torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    return mean + logstd.exp() * noise.to(mean.device), None


@torch.inference_mode()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode raw latents (B, C, h, w) to uint8 (B, H, W, 3) images on the CPU."""
    x = vae.decode(latents.to(vae.device, vae.dtype)).sample.float()
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def encode_variants(
    vae, crops: torch.Tensor, keys: list[str], *, flip: bool, posterior: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode uint8 (b, H, W, 3) crops and, with `flip`, their horizontal flips in the same pass.

    Returns float (b, V, C, h, w) latents and log std (posterior "moments") or None. `keys` (one
    per crop) seed the noise of posterior "sample", per key and variant.
    """
    crops = crops.to(vae.device, non_blocking=True)
    views = [crops, crops.flip(2)] if flip else [crops]  # (b, H, W, 3): flip W
    seeds = (
        [key_seed(k, v) for v in range(len(views)) for k in keys] if posterior == "sample" else None
    )
    mean, logstd = encode_posterior(vae, torch.cat(views), posterior=posterior, seeds=seeds)

    def by_variant(x):  # (V*b, C, h, w) -> (b, V, C, h, w)
        return torch.stack(x.split(len(keys)), dim=1)

    return by_variant(mean), None if logstd is None else by_variant(logstd)
