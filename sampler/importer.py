"""Import an official DiT, SiT or REPA checkpoint into an ordinary latentdit run dir.

    latentdit import DiT-XL-2-256x256.pt --run runs/dit-xl2 --format dit
    latentdit sample runs/dit-xl2 --out samples/ --protocol dit-fid --fid-samples 50000 --npz

Reads both official layouts: a bare state dict (the released `DiT-XL-2-256x256.pt`,
`SiT-XL-2-256.pt`) and a `train.py` checkpoint {"model", "ema", "opt", "args"} (its EMA weights
by default). Loading never unpickles arbitrary objects: `torch.load(weights_only=True)`, with
`argparse.Namespace` (the train.py `args`) as the one allowed class. What the tensor shapes tell
(channels, patch, hidden size, depth, latent size, classes, learn_sigma, MLP ratio) is inferred;
the number of heads comes from `--model` / `--num-heads` (or the checkpoint's args); a flag that
contradicts a shape is refused, naming both values. The written checkpoint records the source
file and its sha256, the time convention (`objective`) and the latent normalization (the official
models see latents times the VAE's `scaling_factor`). Nothing is written unless all checks pass.
REPA's SiT (`--format repa`) is the same network plus projectors, dropped from the model (one kept
for fine-tuning; `sampler.import_repa`).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import pickle
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from latent_store import LatentditError
from latent_store.schema import ClassInfo, VaeInfo
from sampler.errors import CheckpointImportError
from sampler.import_config import ImportConfig
from sampler.import_repa import (
    kept_projector,
    projector_record,
    repa_objective,
    split_projectors,
    unlegacy,
)
from trainer.checkpoint import CHECKPOINTS, FORMAT, VERSION, latest_checkpoint, save_checkpoint
from trainer.model import DiT, ModelConfigError
from trainer.normalization import LatentNormalization
from trainer.objective import DDPM, FlowMatching
from trainer.presets import DIT_PRESETS, has_head

log = logging.getLogger(__name__)

SAFE_GLOBALS = [argparse.Namespace]  # the only class train.py checkpoints pickle
TRAIN_KEYS = ("model", "ema")
REQUIRED = (
    "x_embedder.proj.weight",
    "pos_embed",
    "t_embedder.mlp.0.weight",
    "y_embedder.embedding_table.weight",
    "blocks.0.attn.qkv.weight",
    "final_layer.linear.weight",
)
# official name -> ours (x_embedder.proj is a conv, reshaped separately; pos_embed is checked)
RENAMES = [
    (r"^t_embedder\.mlp\.(\d)\.", r"t_embedder.\1."),
    (r"^y_embedder\.embedding_table\.", "y_embedder."),
    (r"^(blocks\.\d+)\.mlp\.fc1\.", r"\1.mlp.0."),
    (r"^(blocks\.\d+)\.mlp\.fc2\.", r"\1.mlp.2."),
]
NAMES = {"dit": "DiT", "sit": "SiT", "repa": "REPA"}
REPA_ARGS = ("proj_coeff", "enc_type", "encoder_depth")  # only REPA's train.py has these
SUPPORTED = {  # train.py args whose other values latentdit cannot import
    "sit": (("path_type", "Linear"), ("prediction", "velocity")),
    "repa": (("path_type", "linear"), ("prediction", "v"), ("qk_norm", False)),
}
POS_TOLERANCE = 1e-5
HASH_CHUNK = 1 << 24


def sha256(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_official(path: Path, weights: str = "ema") -> tuple[dict[str, Tensor], dict, str]:
    """(state dict, train.py args as a dict or {}, layout "bare" or "train") of a .pt file."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:
            reason = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), "")
            raise CheckpointImportError(
                f"{path}: not a torch checkpoint that loads with weights_only=True ({reason})"
            ) from None
        raise CheckpointImportError(
            f"{path}: refusing to unpickle {found.group(1)}: only state dicts and train.py "
            "checkpoints (tensors, argparse args) are read; re-save the weights alone with "
            "torch.save(state_dict) where you trust the file"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointImportError(
            f"{path}: not a torch checkpoint ({str(e).strip().splitlines()[0]})"
        ) from None

    def tensors(d) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(v, Tensor) for v in d.values())

    if isinstance(obj, dict) and all(k in obj for k in TRAIN_KEYS) and tensors(obj[weights]):
        args = obj.get("args")
        return obj[weights], vars(args) if isinstance(args, argparse.Namespace) else {}, "train"
    if tensors(obj):
        return obj, {}, "bare"
    raise CheckpointImportError(
        f"{path}: not a DiT/SiT checkpoint (a {type(obj).__name__} that is neither a state dict nor "
        f"a train.py dict with {'/'.join(TRAIN_KEYS)})"
    )


def infer_shapes(state: dict[str, Tensor], path: Path) -> dict[str, Any]:
    """What the tensor shapes tell about the model; refuses files that are not DiT/SiT weights."""
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointImportError(
            f"{path}: not a DiT/SiT checkpoint (no {', '.join(missing[:3])}; it has "
            f"{', '.join(list(state)[:3])}...)"
        )
    if state["x_embedder.proj.weight"].ndim != 4:
        raise CheckpointImportError(f"{path}: x_embedder.proj.weight is not a patch convolution")
    hidden, channels, p, q = state["x_embedder.proj.weight"].shape
    tokens = state["pos_embed"].shape[-2]
    grid = math.isqrt(tokens)
    out = state["final_layer.linear.weight"].shape[0]
    if p != q or grid * grid != tokens or out % (p * p):
        raise CheckpointImportError(
            f"{path}: patch {p}x{q} with {tokens} tokens is not a square DiT"
        )
    out_channels = out // (p * p)
    if out_channels not in (channels, 2 * channels):
        raise CheckpointImportError(
            f"{path}: {out_channels} output channels for {channels} input channels (expected "
            f"{channels}, or {2 * channels} with learn_sigma)"
        )
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    return {
        "input_size": grid * p,
        "in_channels": channels,
        "num_classes": state["y_embedder.embedding_table.weight"].shape[0] - 1,
        "patch_size": p,
        "hidden_size": hidden,
        "depth": len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        "mlp_ratio": fc1.shape[0] / hidden if fc1 is not None else 4.0,
        "learn_sigma": out_channels == 2 * channels,
    }


def _preset_name(name: str) -> str:
    """A DiT preset name for DiT-* or SiT-* (the same architectures)."""
    return "DiT-" + name.split("-", 1)[1] if name.startswith("SiT-") else name


def model_config(shapes: dict[str, Any], cfg: ImportConfig, args: dict) -> tuple[str | None, dict]:
    """(preset, DiT config): the shapes, heads from flags/args/preset; contradictions refused."""
    named = cfg.model or args.get("model")
    source = "--model" if cfg.model else "the checkpoint's args.model"
    plain = {n: v for n, v in DIT_PRESETS.items() if not has_head(n)}  # official: no DDT head
    matches = [
        n for n, v in plain.items()
        if (v["hidden_size"], v["depth"], v["patch_size"]) == (shapes["hidden_size"], shapes["depth"], shapes["patch_size"])
    ]  # fmt: skip
    preset = _preset_name(named) if named else (matches[0] if matches else None)
    if named and preset not in plain:
        raise CheckpointImportError(
            f"{source} {named!r} is not a preset of a DiT without a DDT head (official DiT/SiT/REPA "
            f"checkpoints have none); use one of {', '.join(plain)}"
        )
    wanted = dict(DIT_PRESETS[preset]) if preset else {}
    for key in ("hidden_size", "depth", "num_heads"):
        if getattr(cfg, key) is not None:
            wanted[key] = getattr(cfg, key)
    for key in ("hidden_size", "depth", "patch_size"):
        if key in wanted and wanted[key] != shapes[key]:
            flag = (
                f"--{key.replace('_', '-')}"
                if getattr(cfg, key, None) is not None
                else f"{source} {named}"
            )
            raise CheckpointImportError(
                f"{cfg.checkpoint}: the weights have {key} {shapes[key]}, {flag} says {wanted[key]}; "
                f"drop the flag or give --{key.replace('_', '-')} {shapes[key]} (and --num-heads)"
            )
    if "num_heads" not in wanted:
        raise CheckpointImportError(
            f"{cfg.checkpoint}: hidden {shapes['hidden_size']}, depth {shapes['depth']}, patch "
            f"{shapes['patch_size']} match no preset and the weights cannot tell the heads: give --num-heads"
        )
    if args.get("num_classes") not in (None, shapes["num_classes"]):
        raise CheckpointImportError(
            f"{cfg.checkpoint}: the label table has {shapes['num_classes']} classes (+ null), its args "
            f"say num_classes {args['num_classes']}; the file is inconsistent"
        )
    config = {**shapes, "num_heads": wanted["num_heads"], "qk_norm": False, "pos_embed": "sincos",
              "grad_checkpointing": False}  # fmt: skip
    return preset, config


def drop_sigma(state: dict[str, Tensor], channels: int) -> dict[str, Tensor]:
    """The state without the variance half of the output layer (outputs ordered (p, q, c))."""
    w, b = state["final_layer.linear.weight"], state["final_layer.linear.bias"]
    patches = w.shape[0] // (2 * channels)
    return {
        **state,
        "final_layer.linear.weight": w.view(patches, 2 * channels, -1)[:, :channels].reshape(-1, w.shape[1]),
        "final_layer.linear.bias": b.view(patches, 2 * channels)[:, :channels].reshape(-1),
    }  # fmt: skip


def map_state(state: dict[str, Tensor], model: DiT, path: Path) -> dict[str, Tensor]:
    """The official state dict in our names: conv patch embedding as a linear, pos_embed checked."""
    ours: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "pos_embed":
            table = value.reshape(-1, value.shape[-1]).float()
            if not torch.allclose(table, model.pos_embed, atol=POS_TOLERANCE):
                raise CheckpointImportError(
                    f"{path}: pos_embed is not the fixed 2-D sin-cos table DiT builds"
                )
            continue
        if key == "x_embedder.proj.weight":  # (D, C, p, p) conv -> (D, p p C) linear over (p q c)
            ours["x_embedder.weight"] = value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)
            continue
        if key == "x_embedder.proj.bias":
            ours["x_embedder.bias"] = value
            continue
        for pattern, repl in RENAMES:
            key = re.sub(pattern, repl, key)
        ours[key] = value
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    if missing or extra:
        raise CheckpointImportError(
            f"{path}: keys do not fit a DiT (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for key, value in ours.items():
        if value.shape != expected[key].shape:
            raise CheckpointImportError(f"{path}: {key} is {tuple(value.shape)}, expected {tuple(expected[key].shape)}")  # fmt: skip
    return {k: v.float().contiguous() for k, v in ours.items()}


def args_format(args: dict) -> str | None:
    """Which official train.py wrote these args (None: no args, a bare file)."""
    if not args:
        return None
    if any(key in args for key in REPA_ARGS):
        return "repa"
    return "sit" if "path_type" in args else "dit"  # SiT's train.py adds its transport arguments


def check_format(fmt: str, args: dict, path: Path) -> None:
    """Refuse a train.py checkpoint whose args say it is another format, or settings we lack."""
    found = args_format(args)
    if found not in (None, fmt):
        raise CheckpointImportError(
            f"{path}: its train.py args are {NAMES[found]}'s, not {NAMES[fmt]}'s; use --format {found}"
        )
    for key, supported in SUPPORTED.get(fmt, ()):
        if args.get(key, supported) != supported:
            raise CheckpointImportError(
                f"{path}: {NAMES[fmt]} {key} {args[key]!r} is not supported; only {supported!r}"
            )


def objective_for(fmt: str, learn_sigma: bool, args: dict, path: Path):
    """DiT: DDPM, linear betas, 1000 steps; SiT: linear flow in SiT's time (0 = noise, t in [0, 1]);
    REPA: linear flow in REPA's time (1 = noise, t in [0, 1])."""
    if fmt == "dit":
        return DDPM(schedule="linear", num_steps=1000, learn_sigma=learn_sigma)
    if fmt == "repa":
        return repa_objective(args, path)
    return FlowMatching(timesteps="uniform", time_scale=1.0, reverse_time=True)


def vae_info(vae_id: str, latent_side: int) -> VaeInfo:
    """The record of the autoencoder `vae_id` from its config alone (every fact read, never
    typed), checked to make latents of `latent_side` positions per side."""
    from foundation.autoencoders.loading import read_autoencoder, resolve_vae_id

    ae = read_autoencoder(vae_id)
    try:
        ae.latent_side(latent_side * ae.spatial_factor)
    except LatentditError as e:
        raise CheckpointImportError(
            f"the model's {latent_side}x{latent_side} latents: {e}"
        ) from None
    path = resolve_vae_id(vae_id)[0]
    return VaeInfo.of(ae, id=path if Path(path).exists() else vae_id)


def read_classes(path: Path | None, num_classes: int) -> list[dict]:
    """Classes in label order from a file of 'id name...' lines, or ids "0".."K-1"."""
    if path is None:
        return [asdict(ClassInfo(index=i, id=str(i))) for i in range(num_classes)]
    lines = [line.split(maxsplit=1) for line in Path(path).read_text().splitlines() if line.strip()]
    if len(lines) != num_classes:
        raise CheckpointImportError(
            f"--classes {path}: {len(lines)} classes, the model has {num_classes}"
        )
    return [asdict(ClassInfo(index=i, id=p[0], name=p[1] if len(p) > 1 else "")) for i, p in enumerate(lines)]  # fmt: skip


def import_checkpoint(cfg: ImportConfig) -> Path:
    """Check and convert `cfg.checkpoint`, then write RUN/checkpoints/0000000; returns that folder."""
    src = Path(cfg.checkpoint).resolve()
    if latest_checkpoint(cfg.run) is not None or (Path(cfg.run) / CHECKPOINTS).exists():
        raise CheckpointImportError(f"--run {cfg.run} already holds checkpoints; use a new --run")
    state, args, layout = read_official(src, cfg.weights)
    check_format(cfg.format, args, src)
    state, projectors = split_projectors(unlegacy(state, args, src), cfg.format, src)
    shapes = infer_shapes(state, src)
    sigma_dropped = cfg.format == "sit" and shapes["learn_sigma"]
    if sigma_dropped:  # SiT's forward discards it: without it the model is the same, and trainable
        state, shapes = drop_sigma(state, shapes["in_channels"]), {**shapes, "learn_sigma": False}
    preset, config = model_config(shapes, cfg, args)
    try:
        model = DiT(**config)
    except ModelConfigError as e:
        raise CheckpointImportError(f"{src}: {e}") from None
    model.load_state_dict(map_state(state, model, src))
    vae = vae_info(cfg.vae, config["input_size"])
    if vae.latent_channels != config["in_channels"]:
        raise CheckpointImportError(
            f"--vae {cfg.vae} has {vae.latent_channels} latent channels, the model {config['in_channels']}"
        )
    objective = objective_for(cfg.format, config["learn_sigma"], args, src)
    channels, size = config["in_channels"], config["input_size"]
    mean, std = vae.channel_affine(channels)
    norm = LatentNormalization(kind="vae_scaling", mean=mean, std=std)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"preset": preset, "config": dict(model.config)},
        "objective": objective.to_meta(),
        "normalization": norm.to_meta(),
        "latent_shape": [channels, size, size],
        "classes": read_classes(cfg.classes, config["num_classes"]),
        "vae": asdict(vae),
        "store": None,
        "source": {
            "path": str(src), "sha256": sha256(src), "format": cfg.format, "layout": layout,
            "weights": cfg.weights if layout == "train" else None, "sigma_dropped": sigma_dropped,
            "args": {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, type(None)))},
        },
    }  # fmt: skip
    if projectors:
        meta["source"]["projectors"] = projector_record(projectors, args)
        record = meta["source"]["projectors"]
        log.info(
            "dropped %d projector tensors (REPA's alignment MLPs to z_dims %s, read at block "
            "encoder_depth %s; sampling never uses them)",
            record["dropped_tensors"], record["z_dims"], record["encoder_depth"] or "unknown",
        )  # fmt: skip
    folder = save_checkpoint(
        cfg.run,
        step=0,
        model=model,
        ema=model,
        train_state={},
        meta=meta,
        files=kept_projector(projectors),
    )
    log.info("imported %s (%s, %s layout) into %s", src, cfg.format, layout, folder)
    return folder
