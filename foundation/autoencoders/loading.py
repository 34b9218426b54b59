"""Resolve an autoencoder id and load it: its facts only, the whole model, or its decoder only.

    ae = load_autoencoder(VaeConfig(id="stabilityai/sd-vae-ft-ema", dtype="bf16", device="cuda"))
    decoder = load_decoder("mit-han-lab/dc-ae-f32c32-in-1.0-diffusers")  # encoder never read
    facts = read_autoencoder("black-forest-labs/FLUX.2-dev")            # the config alone

Ids are a local folder (saved with `save_pretrained`), a pipeline folder holding `vae/`, or a hub
id (a model repo, or a pipeline repo whose `vae/` holds it; its cache, revision and HF_HUB_OFFLINE
honoured). The family comes from the config's `_class_name` (see `families`). Importing this
module imports neither torch nor diffusers, so the configs that name a VaeConfig stay cheap.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foundation.errors import VaeLoadError
from foundation.precision import NAMES as PRECISION_NAMES
from foundation.precision import torch_dtype

if TYPE_CHECKING:
    import torch

    from foundation.autoencoders.base import Autoencoder

log = logging.getLogger(__name__)

VAE_SUBFOLDER = "vae"  # where full pipeline repos keep their autoencoder
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"  # a sharded model's key -> file
HUB_NOISE = ".*local_dir_use_symlinks"  # a deprecation warning of older hub clients


@dataclass(frozen=True, kw_only=True)
class VaeConfig:
    """Which autoencoder to load and how to run it."""

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
    """(path or hub id, subfolder); a local pipeline folder's autoencoder lives in its `vae/`."""
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
        raise VaeLoadError(f"--vae {vae_id}: no such folder; pass a model folder or a hub id")
    return vae_id, None


def read_vae_config(path: str, subfolder: str | None, **kwargs) -> tuple[dict, str | None]:
    """The model's config and the subfolder holding it (hub pipeline repos keep it in `vae/`)."""
    from diffusers import AutoencoderKL as AnyModel  # any model class reads any config.json

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", HUB_NOISE, category=UserWarning)
        try:
            return AnyModel.load_config(path, subfolder=subfolder, **kwargs), subfolder
        except OSError as first:
            if subfolder is not None or Path(path).exists():
                raise
            try:
                config = AnyModel.load_config(path, subfolder=VAE_SUBFOLDER, **kwargs)
            except OSError:
                raise first from None
            return config, VAE_SUBFOLDER


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _hint(path: str) -> str:
    if hub_offline() and not Path(path).exists():
        return "HF_HUB_OFFLINE is set and it is not in the HF cache: download it first or pass a local folder"
    return (
        "need a diffusers autoencoder folder with config.json and safetensors weights, or a hub id"
    )


def _located(
    vae_id: str, revision: str | None, action: str
) -> tuple[str, str | None, dict, Autoencoder]:
    """(path, subfolder, hub kwargs, the family with no model yet) of an id; errors say that
    it cannot `action`."""
    from foundation.autoencoders.families import autoencoder_for

    path, subfolder = resolve_vae_id(vae_id)
    kwargs = {"revision": revision, "local_files_only": hub_offline()}
    try:
        config, subfolder = read_vae_config(path, subfolder, **kwargs)
    except (OSError, ValueError) as e:
        raise VaeLoadError(
            f"--vae {vae_id}: cannot {action} ({_first_line(e)}; {_hint(path)})"
        ) from None
    return path, subfolder, kwargs, autoencoder_for(config, vae_id)


def read_autoencoder(vae_id: str, revision: str | None = None) -> Autoencoder:
    """The facts of an autoencoder from its config alone (no weights read; `model` is None)."""
    return _located(vae_id, revision, "read its config")[3]


def load_autoencoder(cfg: VaeConfig) -> Autoencoder:
    """The whole model in eval mode on cfg.device (channels_last, encoder compiled as asked)."""
    import diffusers
    import torch

    path, subfolder, kwargs, ae = _located(cfg.id, cfg.revision, "load VAE")
    # without accelerate, diffusers warns on every load unless asked for the plain path
    low_mem = importlib.util.find_spec("accelerate") is not None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", HUB_NOISE, category=UserWarning)
            model = getattr(diffusers, ae.family).from_pretrained(
                path,
                subfolder=subfolder,
                torch_dtype=torch_dtype(cfg.dtype),
                low_cpu_mem_usage=low_mem,
                **kwargs,
            )
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise VaeLoadError(
            f"--vae {cfg.id}: cannot load VAE ({ae.family}: {_first_line(e)}; {_hint(path)})"
        ) from None
    model = model.to(cfg.device).eval().requires_grad_(False)
    dtype = torch_dtype(cfg.dtype)
    if model.dtype != dtype and not model._keep_in_fp32_modules:
        # from_pretrained leaves AutoencoderRAE's transformers encoder in float32; ModelMixin.to
        # would warn of float32-kept modules even for a model that keeps none
        torch.nn.Module.to(model, dtype=dtype)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.encoder = torch.compile(model.encoder)
    ae.model = model
    return ae


def _weight_files(path: str, subfolder: str | None, kwargs: dict, wanted) -> list[Path]:
    """The safetensors files holding the tensors `wanted(key)` selects: the one weights file, or
    only the shards of a sharded model that hold any of them."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def fetch(name: str) -> Path:
        if not Path(path).is_dir():
            return Path(hf_hub_download(path, name, subfolder=subfolder, **kwargs))
        file = Path(path, subfolder or "", name)
        if not file.is_file():
            raise OSError(f"no {name} in {file.parent}")
        return file

    try:
        return [fetch(WEIGHTS)]
    except (OSError, EntryNotFoundError) as single:
        try:
            index = json.loads(fetch(WEIGHTS_INDEX).read_text())
        except (OSError, EntryNotFoundError, ValueError):
            raise single from None
    return [
        fetch(name) for name in sorted({f for k, f in index["weight_map"].items() if wanted(k)})
    ]


def load_decoder(
    vae_id: str, *, revision: str | None = None, device: str | torch.device = "cpu"
) -> Autoencoder:
    """The model with its encoder modules left out (None), in float32 eval mode on `device`.

    The model is built on the meta device and only the tensors outside `encoder_modules` are read
    from the safetensors files: the encoder's weights (a DC-AE's encoder, an RAE's transformers
    ViT) never reach memory.
    """
    import diffusers
    import torch
    from safetensors import safe_open

    path, subfolder, kwargs, ae = _located(vae_id, revision, "load its decoder")
    skipped = tuple(f"{name}." for name in ae.encoder_modules)
    try:
        files = _weight_files(path, subfolder, kwargs, lambda k: not k.startswith(skipped))
    except (OSError, ValueError) as e:
        raise VaeLoadError(
            f"--vae {vae_id}: cannot load its decoder ({_first_line(e)}; {_hint(path)})"
        ) from None
    try:
        with torch.device("meta"):
            model = getattr(diffusers, ae.family).from_config(ae.config)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ae.refuse(f"cannot build it from its config: {_first_line(e)}") from None
    for name in ae.encoder_modules:
        setattr(model, name, None)
    state = {}
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            keys = [k for k in f.keys() if not k.startswith(skipped)]  # noqa: SIM118
            state.update({k: f.get_tensor(k).float() for k in keys})
    state = model._fix_state_dict_keys_on_load(
        state
    )  # diffusers' rename of pre-0.14 attention keys
    _check_keys(model, state, vae_id, files[0].name)
    model.load_state_dict(state, strict=True, assign=True)
    ae.materialize(model)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), "left on meta"
    log.info("loaded the decoder of %s %s (%d tensors)", ae.family, vae_id, len(state))
    ae.model = model.to(device).eval().requires_grad_(False)
    return ae


def _check_keys(model, state: dict[str, Any], vae_id: str, file: str) -> None:
    """Drop the keys diffusers ignores on load; refuse weights that do not fit the config."""
    import re

    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    wanted = set(model.state_dict())
    for key in [k for k in state if k not in wanted and any(re.search(p, k) for p in ignored)]:
        del state[key]
    missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or extra:
        raise VaeLoadError(
            f"--vae {vae_id}: {file} does not fit its config "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
