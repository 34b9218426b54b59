"""Checkpoints: everything to resume exactly, and everything a sampler needs, in one folder.

    RUN/checkpoints/0005000/model.safetensors   the trained weights (unwrapped module)
                            ema.safetensors     the EMA weights (what samplers use)
                            state.pt            optimizer, schedule, step, RNG states, data position
                                                (torch.load(..., weights_only=True) loads it)
                            meta.json           format, step, model preset + config, objective,
                                                normalization, latent shape, classes, VAE, store
                            normalization.safetensors   per-position normalization only (its
                                                digest in meta.json; `trainer.normalization`)
    RUN/checkpoints/latest                      text: the name of the newest step folder

Folders are written under a temporary name and renamed; `latest` is replaced atomically, so a
killed run leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from latent_store import LatentditError, LatentStore
from trainer.model import DiT, model_from_config
from trainer.normalization import LatentNormalization
from trainer.objective import FlowMatching, Objective, objective_from_meta
from trainer.repa import init_state, sampling_config, without_projector

log = logging.getLogger(__name__)

FORMAT = "latentdit.checkpoint"
VERSION = 1
STEP_DIGITS = 7
CHECKPOINTS = "checkpoints"
LATEST = "latest"
META, STATE = "meta.json", "state.pt"
WEIGHTS = {"model": "model.safetensors", "ema": "ema.safetensors"}


class CheckpointNotFoundError(LatentditError):
    """No checkpoint at the given path."""


class CheckpointMismatchError(LatentditError):
    """A checkpoint's format or provenance disagrees with what the caller expects."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its folder, meta.json, both weight sets and the training state."""

    path: Path
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]


def store_fingerprint(store: LatentStore) -> str:
    """A digest of the store's shard checksums: it changes when any shard's data changes."""
    h = hashlib.blake2b(digest_size=16)
    for record in store.records():
        h.update((record.checksum if record else "-").encode())
    return f"blake2b-128:{h.hexdigest()}"


def checkpoint_meta(
    *,
    preset: str,
    model: DiT,
    objective: Objective,
    normalization: LatentNormalization,
    store: LatentStore,
) -> dict[str, Any]:
    """The provenance recorded in every checkpoint's meta.json (all but the step)."""
    spec = store.spec
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": {"preset": preset, "config": dict(model.config)},
        "objective": objective.to_meta(),
        "normalization": normalization.to_meta(),
        "latent_shape": list(spec.latent_shape),
        "classes": [asdict(c) for c in spec.classes],
        "vae": asdict(spec.vae),
        "store": {
            "path": str(store.path),
            "fingerprint": store_fingerprint(store),
            "num_samples": spec.num_samples,
            "variants": list(spec.variants),
            "image_size": spec.image_size,
            "crop": spec.crop,
        },
    }


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch, CUDA) as weights_only-loadable values."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_name(step: int) -> str:
    return f"{step:0{STEP_DIGITS}d}"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(folder: Path, keep_last: int) -> None:
    steps = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    for old in steps[:-keep_last]:
        shutil.rmtree(old)
        log.info("pruned checkpoint %s", old)


def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    step: int,
    model: nn.Module,
    ema: nn.Module,
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int | None = None,
    files: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write RUN/checkpoints/<step>/ atomically, point `latest` at it, keep the newest `keep_last`.

    `model` and `ema` must be the unwrapped modules (not DDP, not torch.compile wrappers).
    `train_state` must hold only tensors, numbers, strings and containers of them. `files`:
    more safetensors files of the folder, {name: tensors} (`LatentNormalization.files()`).
    """
    folder = Path(run_dir) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / step_name(step)
    for stale in folder.glob(".tmp-*"):  # left by a killed writer (rank 0 is the only one)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".tmp-{step_name(step)}-{os.getpid()}"
    tmp.mkdir()
    for name, module in (("model", model), ("ema", ema)):
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(state, tmp / WEIGHTS[name])
    for name, tensors in (files or {}).items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / name)
    torch.save({**train_state, "step": step}, tmp / STATE)
    (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(folder / LATEST, final.name + "\n")
    if keep_last is not None:
        _prune(folder, keep_last)
    log.info("saved checkpoint %s", final)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder `RUN/checkpoints/latest` names, or None when the run has no checkpoint."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / META).is_file() else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder or a run dir (through `latest`)."""
    p = Path(path)
    if (p / META).is_file():
        return p
    found = latest_checkpoint(p)
    if found is None:
        raise CheckpointNotFoundError(
            f"{p}: no checkpoint here (expected a run dir with checkpoints/{LATEST} or a folder "
            f"with {META}); train first with `latentdit train --run {p}`"
        )
    return found


def read_meta(folder: Path) -> dict[str, Any]:
    """meta.json of a checkpoint folder, checked for format and version."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointMismatchError(
            f"{folder / META} is unreadable ({str(e).splitlines()[0]}); the checkpoint is "
            "damaged: use an earlier one (point checkpoints/latest at it) or retrain"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointMismatchError(
            f"{folder / META} is not a JSON object; the checkpoint is damaged"
        )
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointMismatchError(
            f"{folder}: checkpoint format {meta.get('format')!r} v{meta.get('version')!r} is not "
            f"{FORMAT!r} v{VERSION}; use the latentdit version that wrote it"
        )
    return meta


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a checkpoint (folder or run dir) on the CPU, with its training state, for resuming."""
    folder = resolve_checkpoint(path)
    return Checkpoint(
        path=folder,
        meta=read_meta(folder),
        model_state=load_file(folder / WEIGHTS["model"]),
        ema_state=load_file(folder / WEIGHTS["ema"]),
        train_state=torch.load(folder / STATE, weights_only=True),
    )


def init_weights(
    model: DiT, path: str | os.PathLike, *, objective: Objective, normalization: LatentNormalization
) -> Objective:
    """Load the EMA weights of a checkpoint (e.g. an imported official model) into `model`.

    Refuses a checkpoint whose model, objective or latent normalization differ from the run's,
    naming both values. Returns the objective to train with: the checkpoint's own (its time
    convention: SiT's reversed time, DiT's learned variance), with the run's flow-matching
    timestep density. REPA's projector is not part of the comparison: a run with one keeps the
    checkpoint's where the widths fit, else starts its own (`trainer.repa.init_state`).
    """
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    theirs, ours = (sampling_config(c) for c in (meta["model"]["config"], model.config))
    for config in (theirs, ours):
        config.pop("grad_checkpointing", None)
        config.setdefault("learn_sigma", False)
    checks = [
        ("model", theirs, ours),
        ("objective kind", meta["objective"]["kind"], objective.KIND),
        ("normalization", meta["normalization"], normalization.to_meta()),
    ]
    init_objective = objective_from_meta(meta["objective"])
    if not isinstance(init_objective, FlowMatching):
        checks.append(("objective", init_objective.to_meta(), objective.to_meta()))
    for what, a, b in checks:
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                keys = [k for k in {**a, **b} if a.get(k) != b.get(k)]
                a, b = ({k: d.get(k) for k in keys} for d in (a, b))
            raise CheckpointMismatchError(
                f"--init {folder}: its {what} {a} differs from this run's {b}; train with the "
                "options that match it (--model, --objective, --learn-sigma, --normalization)"
            )
    model.load_state_dict(init_state(model, load_file(folder / WEIGHTS["ema"]), folder))
    log.info("initialized from %s (step %s)", folder, meta.get("step"))
    if isinstance(init_objective, FlowMatching):
        return FlowMatching(
            timesteps=objective.timesteps,
            time_scale=init_objective.time_scale,
            reverse_time=init_objective.reverse_time,
        )
    return init_objective


def load_for_inference(
    path: str | os.PathLike, *, weights: str = "ema", device: str | torch.device = "cpu"
) -> tuple[DiT, dict[str, Any]]:
    """Rebuild the DiT of a checkpoint (folder or run dir) with its EMA or raw weights, in eval mode.

    Returns (model, meta); meta.json holds the objective, normalization, classes and VAE. A
    per-position normalization's values are read from the folder (and checked against their
    digest) into meta["normalization"]. REPA's projector, a training-only part, is left out.
    """
    if weights not in WEIGHTS:
        raise CheckpointMismatchError(f"weights {weights!r} is not one of {list(WEIGHTS)}")
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    norm = LatentNormalization.from_meta(meta["normalization"], folder)
    meta["normalization"] = norm.resolved_meta()
    model = model_from_config(sampling_config(meta["model"]["config"]))
    model.load_state_dict(without_projector(load_file(folder / WEIGHTS[weights])))
    return model.to(device).eval(), meta
