"""Run folders: the saved config a bare `--run` resumes from, and the checks before a resume.

    latentdit train --run runs/b2                 # resumes from runs/b2/config.json
    latentdit train --run runs/b2 --steps 800000  # ... and trains further

On a resume, options given on the command line (or in --config) may change only what does not
change what is learned (`RESUMABLE_CHANGES`); anything else is refused, naming the option and both
values. Every check runs before anything in the run folder is written, so a refused resume leaves
it exactly as it was.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from foundation.config import read_config_file
from foundation.errors import ConfigError
from trainer.checkpoint import (
    CheckpointMismatchError,
    latest_checkpoint,
    read_meta,
)
from trainer.config import RESUMABLE_CHANGES, TrainConfig
from trainer.metrics import LOG_FILE
from trainer.repa import check_resumed_features

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# checkpoint meta entries that must match the model, objective and normalization of a resume
RESUMED_META = ("model", "objective", "normalization", "latent_shape", "classes")
RECOMPUTE_KEY = "grad_checkpointing"  # in the model config, but only what backward recomputes


def _learned(key: str, value: Any) -> Any:
    """A meta entry without what may change on resume (the model's recompute flag)."""
    if key != "model" or not isinstance(value, dict) or "config" not in value:
        return value
    config = {k: v for k, v in value["config"].items() if k != RECOMPUTE_KEY}
    return {**value, "config": config}


def _check_run_path(run: str) -> None:
    if run and Path(run).exists() and not Path(run).is_dir():
        raise ConfigError(f"--run {run}: a file, not a run folder; give a folder (new or a run's)")


def saved_config(run: str | os.PathLike) -> dict[str, Any] | None:
    """The options a run folder was started with (RUN/config.json), or None for a new run.

    `latentdit train` puts them below --config and the command line (`--run RUN` alone resumes);
    `check_resume` then refuses what a resume must not change.
    """
    _check_run_path(str(run))
    path = Path(run) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return read_config_file(path, TrainConfig, "train")
    except ConfigError as e:
        raise ConfigError(
            f"{path} is unreadable ({str(e).split(': ', 1)[-1]}); restore it, or give every "
            "option with a new --run"
        ) from None


def resume_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """'--lr: 0.0001 (run) vs 0.0002 (now)' for each option that a resume must not change."""
    now = json.loads(cfg.to_json())
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    old = {k: saved.get(k, defaults.get(k)) for k in now}
    return [
        f"--{k.replace('_', '-')}: {old[k]!r} (run) vs {now[k]!r} (now)"
        for k in now
        if k not in RESUMABLE_CHANGES and old[k] != now[k]
    ]


def check_resume(cfg: TrainConfig, meta: dict[str, Any]) -> int:
    """The step a run resumes from (0 for a new run), after every check a resume needs.

    Reads only: the run's config.json and its latest checkpoint's meta.json. Refuses changed
    options, --steps below the checkpoint's step, another store's data or features, another model.
    """
    _check_run_path(cfg.run)
    run = Path(cfg.run)
    latest = latest_checkpoint(run)
    if latest is None:
        return 0
    saved = saved_config(run)
    if saved is not None and (changes := resume_changes(saved, cfg)):
        safe = ", ".join(sorted("--" + k.replace("_", "-") for k in RESUMABLE_CHANGES))
        raise ConfigError(
            f"{run} was trained with other options ({'; '.join(changes)}); a resume may change "
            f"only {safe}: drop the others or use a new --run"
        )
    ckpt = read_meta(latest)
    if ckpt.get("store") is None:  # written by `latentdit import`: weights without training state
        raise CheckpointMismatchError(
            f"{latest} is an imported checkpoint (no training state to resume); start a new "
            f"--run from its weights with --init {latest}"
        )
    try:
        step, fingerprint = int(ckpt["step"]), ckpt["store"]["fingerprint"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointMismatchError(
            f"{latest}/meta.json lacks its step or store fingerprint; use a new --run"
        ) from None
    if cfg.steps < step:
        raise ConfigError(
            f"--steps {cfg.steps} is below the step of {latest} ({step}); give --steps {step} or "
            "more to train further, or a new --run"
        )
    if fingerprint != meta["store"]["fingerprint"]:
        raise CheckpointMismatchError(
            f"{latest} was trained on store {ckpt['store'].get('path')} with other data "
            f"(fingerprint {fingerprint} vs {meta['store']['fingerprint']}); "
            "use that store or a new --run"
        )
    check_resumed_features(latest, ckpt.get("repa"), meta.get("repa"))
    for key in RESUMED_META:
        if _learned(key, ckpt.get(key)) != _learned(key, meta.get(key)):
            raise CheckpointMismatchError(
                f"{latest} holds another {key} ({ckpt.get(key)!r}) than this run builds "
                f"({meta.get(key)!r}); use a new --run"
            )
    return step


@dataclass(frozen=True, kw_only=True)
class TrainSummary:
    """What a `train` call did, for the closing lines of `latentdit train`."""

    run: Path
    checkpoint: Path | None
    """The latest checkpoint folder (None: no checkpoint written yet)."""
    parameters: int
    start_step: int
    """The step this call resumed from (0: a new run)."""
    steps: int
    """The step the run is at now."""
    seconds: float
    images_per_s: float
    """Global samples per second over the steps of this call (0 when none ran)."""
    final_loss: float | None
    """The loss of the last log record (averaged over its --log-every steps)."""
    rank: int = 0
    """The process's rank (the CLI prints the summary of rank 0)."""

    @classmethod
    def of(cls, cfg: TrainConfig, model, *, start: int, seconds: float, loss: float | None, rank=0):
        run = Path(cfg.run)
        if loss is None and (log_file := run / LOG_FILE).is_file():
            lines = log_file.read_text().splitlines()
            loss = json.loads(lines[-1])["loss"] if lines else None
        ran = max(cfg.steps - start, 0)
        return cls(
            run=run,
            checkpoint=latest_checkpoint(run),
            parameters=sum(p.numel() for p in model.parameters()),
            start_step=start,
            steps=max(start, cfg.steps),
            seconds=seconds,
            images_per_s=ran * cfg.batch_size / seconds if ran and seconds > 0 else 0.0,
            final_loss=loss,
            rank=rank,
        )

    def format(self) -> str:
        ran = self.steps - self.start_step
        resumed = f" (resumed at step {self.start_step})" if self.start_step else ""
        loss = "n/a" if self.final_loss is None else f"{self.final_loss:.4f}"
        return "\n".join(
            [
                f"{self.run}: step {self.steps}{resumed}, {ran} steps in {self.seconds:.1f} s "
                f"({self.images_per_s:.1f} images/s), final loss {loss}",
                f"model        {self.parameters / 1e6:.2f}M parameters",
                f"checkpoint   {self.checkpoint}",
                f"next         latentdit sample {self.run} --out {self.run / 'samples'}  "
                f"(or train further: latentdit train --run {self.run} --steps N)",
            ]
        )
