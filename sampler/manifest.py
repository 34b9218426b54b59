"""OUT/sample.json: the settings that determine a run's pixels, written once and checked on resume.

    settings = run_settings(cfg, "heun", folder, meta, labels, precision=Precision.bf16)
    check_manifest(out, settings, legacy=legacy_defaults(device))

A resumed run must match every recorded setting, or its images would mix two kinds of output in
one FID set. Besides the solver's and the plan's settings, the ones that change pixels without
changing the plan are recorded too: `precision` (the resolved autocast dtype), `compile` (null =
eager) and `cast_weights`. The batch size and the rank count are not: each image's noise comes
from its own generator, so they change nothing beyond float rounding.

A sample.json written before `precision`, `compile` and `cast_weights` were recorded is read as
made with the defaults of its time: eager, weights as stored, and the device's default precision
(bf16 on CUDA, fp32 on the CPU) of the device that resumes it; the file is left as it is.
`model_calls` (per image) and `label_sampling` are recorded for `latentdit evaluate --json`; they
follow from the other settings, so an older file without them resumes as it did.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from foundation.precision import Precision, resolve_precision
from sampler.config import SampleConfig, SolveConfig
from sampler.errors import SamplerError
from sampler.outputs import MANIFEST
from sampler.solvers import SOLVERS

PIXEL_SETTINGS = ("precision", "compile", "cast_weights")
"""Settings that change the pixels without changing the plan (older manifests lack them)."""
DERIVED_SETTINGS = ("model_calls", "label_sampling")
"""Settings recorded for readers (`latentdit evaluate --json`) that follow from the others: an older
manifest without them is read as holding this run's values."""


def run_settings(
    cfg: SampleConfig,
    sampler: str,
    folder: Path,
    meta: dict,
    labels: np.ndarray,
    *,
    precision: Precision,
) -> dict:
    """The settings that determine the images; a resumed run must match them exactly."""
    solve = cfg.solve
    return {
        "checkpoint": str(folder.resolve()),
        "step": meta.get("step"),
        "weights": cfg.weights,
        "sampler": sampler,
        **{k: getattr(solve, k) for k in ("steps", "cfg", "shift", "eta")},
        "cfg_interval": list(solve.cfg_interval) if solve.cfg_interval else None,
        "seed": cfg.seed,
        "first_index": cfg.first_index,
        "vae": cfg.vae or meta["vae"]["id"],
        "count": len(labels),
        "labels_blake2b": hashlib.blake2b(labels.tobytes(), digest_size=16).hexdigest(),
        "label_sampling": label_sampling(cfg),
        "model_calls": SOLVERS[sampler].calls_per_step * solve.steps,
        **_import_settings(cfg),
        "precision": str(precision),
        "compile": cfg.compile,
        "cast_weights": cfg.cast_weights,
    }


def label_sampling(cfg: SampleConfig) -> str:
    """How the labels were drawn (`sampler.plan.plan_labels`): "balanced" (--fid-samples: image i is
    of class i mod K), "requested" (--class ... --n N), or "uniform" (random classes, --seed)."""
    if cfg.fid_samples is not None:
        return "balanced"
    return "requested" if cfg.classes else "uniform"


def _import_settings(cfg: SampleConfig) -> dict:
    """The settings of the official protocols (only when set: older manifests stay valid)."""
    solve = cfg.solve
    found = {
        "cfg_channels": solve.cfg_channels,
        "variance": solve.variance,
        "spacing": None if solve.spacing == "trailing" else solve.spacing,
        "diffusion": None if solve.diffusion == 1.0 else solve.diffusion,
        "last_step": solve.last_step,
        "noise_blake2b": file_digest(cfg.noise) if cfg.noise else None,
        "save_latents": cfg.save_latents or None,
    }
    return {k: v for k, v in found.items() if v is not None}


def file_digest(path: Path) -> str:
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()


def legacy_defaults(device) -> dict[str, Any]:
    """What a sample.json without the pixel settings was made with: the defaults of its time."""
    return {
        "precision": str(resolve_precision(None, device)),
        "compile": None,
        "cast_weights": False,
    }


def check_manifest(
    out: Path, settings: Mapping[str, Any], *, legacy: Mapping[str, Any] | None = None
) -> None:
    """Write OUT/sample.json, or check that an existing one holds the same settings.

    Keys missing from an existing file take their `legacy` value; a difference is refused with
    both values and the options that resume the run there. The file is never rewritten.
    """
    path = out / MANIFEST
    if path.is_file():
        before = {**(legacy or {}), **json.loads(path.read_text())}
        diffs = [k for k, v in settings.items() if before.get(k) != v and k not in DERIVED_SETTINGS]
        if diffs:
            shown = "; ".join(
                f"{k} {before.get(k)!r} there vs {settings[k]!r} now" for k in diffs[:3]
            )
            hints = " ".join(h for h in (resume_hint(k, before.get(k)) for k in diffs[:3]) if h)
            raise SamplerError(
                f"{out} holds samples made with other settings ({shown}); resume with the "
                f"settings there{f' ({hints})' if hints else ''} or choose another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(dict(settings), indent=2))
    os.replace(tmp, path)


OPTION_NAMES = {*SampleConfig.__dataclass_fields__, *SolveConfig.__dataclass_fields__} - {
    "checkpoint"  # the positional argument
}


def resume_hint(key: str, value: Any) -> str | None:
    """The command-line option that gives `key` the recorded `value`; None for derived keys."""
    if key not in OPTION_NAMES:
        return None
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    if value is None:
        return f"no {flag}"
    if isinstance(value, list):
        return f"{flag} {' '.join(map(str, value))}"
    return f"{flag} {value}"
