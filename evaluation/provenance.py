"""What an evaluate result says about how its inputs were made: the sample settings and the
reference's identity.

    sample_settings(Path("fid/dit-xl2/samples_50000x256x256x3.npz"))  # from sample.json beside it
    reference_identity(Path("VIRTUAL_imagenet256_labeled.npz"))       # size, SHA-256, known name

Samples made by `latentdit sample` carry OUT/sample.json (`sampler.manifest`): the checkpoint, its
step, EMA or raw weights, the solver, its steps and model calls, guidance (scale, interval,
channels), how labels were drawn, the precision and the seed. It is read from the sample folder,
or beside its `.npz` or `images/` folder. A reference file is identified by its size and SHA-256;
a file known from public sources is named as such.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from evaluation.inputs import SAMPLE_IMAGES, SAMPLE_MANIFEST
from sampler.importer import sha256

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # RUN/checkpoints/<step> (trainer.checkpoint)
# Reference files whose SHA-256 and size are published (name: what it is, where the figures come from).
KNOWN_REFERENCES = {
    "b32732719497e42660a9affb4a966068cba0855ac449b82015e34ec376d20758": {
        "bytes": 2_037_122_530,
        "name": "ADM's VIRTUAL_imagenet256_labeled.npz (openai/guided-diffusion reference batch "
        "for ImageNet 256x256: 10,000 images, the statistics of the training set)",
        "source": "SHA-256 and size as published in public repositories (e.g. the Git LFS pointer "
        "of ruizegao/efficient-dit, and the download manifests of several others)",
    },
}


def reference_identity(path: Path) -> dict[str, Any]:
    """{"file", "bytes", "sha256", "known_as"} of a reference file; a folder or a store: its path
    (their contents are identified by what they hold, e.g. a store's seal, not checksummed here)."""
    path = Path(path)
    if not path.is_file():
        return {"file": None, "folder": str(path), "bytes": None, "sha256": None, "known_as": None}
    size = path.stat().st_size
    digest = sha256(path)
    known = KNOWN_REFERENCES.get(digest)
    if known is not None and known["bytes"] != size:
        known = None
    return {
        "file": path.name,
        "bytes": size,
        "sha256": digest,
        "known_as": None if known is None else known["name"],
    }


def find_manifest(path: Path) -> Path | None:
    """sample.json of a `latentdit sample` folder given as the folder, its .npz or its images/."""
    path = Path(path)
    candidates = [path / SAMPLE_MANIFEST] if path.is_dir() else []
    if path.is_file() or path.name == SAMPLE_IMAGES:
        candidates.append(path.parent / SAMPLE_MANIFEST)
    return next((c for c in candidates if c.is_file()), None)


def _run_of(checkpoint: str | None) -> str | None:
    """The run folder of RUN/checkpoints/<step>; None for a checkpoint elsewhere."""
    if not checkpoint:
        return None
    folder = Path(checkpoint)
    return str(folder.parent.parent) if folder.parent.name == CHECKPOINTS else None


def _model_calls(m: dict[str, Any]) -> int | None:
    """Model calls per image: recorded, or the solver's calls per step x steps (older files)."""
    if "model_calls" in m:
        return m["model_calls"]
    from sampler.solvers import SOLVERS

    solver = SOLVERS.get(m.get("sampler"))
    return None if solver is None or m.get("steps") is None else solver.calls_per_step * m["steps"]


def sample_settings(path: Path) -> dict[str, Any] | None:
    """The settings `latentdit sample` recorded for the samples at `path` (None: not its output)."""
    manifest = find_manifest(path)
    if manifest is None:
        return None
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        log.warning(
            "%s: unreadable (%s); the result will not carry the sample settings", manifest, e
        )
        return None
    if not isinstance(m, dict):
        return None
    return {
        "sample_json": str(manifest),
        "run": _run_of(m.get("checkpoint")),
        "checkpoint": m.get("checkpoint"),
        "step": m.get("step"),
        "ema": None if "weights" not in m else m["weights"] == "ema",
        "solver": m.get("sampler"),
        "steps": m.get("steps"),
        "model_calls": _model_calls(m),
        "guidance": {
            "scale": m.get("cfg"),
            "interval": m.get("cfg_interval"),
            "channels": m.get("cfg_channels") or "all",
        },
        "label_sampling": m.get("label_sampling"),
        "precision": m.get("precision"),
        "seed": m.get("seed"),
        "count": m.get("count"),
        "recorded": m,
    }
