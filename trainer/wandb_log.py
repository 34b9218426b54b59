"""Weights & Biases beside TensorBoard: `latentdit train --wandb [--wandb-project P] [--wandb-name N]`.

    WANDB_MODE=offline latentdit train ... --wandb     # files under $WANDB_DIR (default: RUN)

Rank 0 only (`trainer.metrics.TrainLogger` starts it). The run's config (storage options left
out: they may hold credentials), every training record (loss and its named terms, grad norm, LR,
throughput, MFU, the cost fields of `trainer.cost`) under train/, every evaluation record (FID ...)
under eval/, and each EMA sample grid as an image. The W&B run id is kept in RUN/wandb.json, so a
resumed run continues the same W&B run; records are plotted against their training step (the
`step` metric), so the steps a resume repeats after its checkpoint do not break W&B's own
step counter. `wandb` is an optional dependency (`pip install 'latentdit[wandb]'`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from foundation.errors import ConfigError

log = logging.getLogger(__name__)

ID_FILE = "wandb.json"
STEP = "step"
PRIVATE_CONFIG = ("storage_options",)  # may hold credentials: never sent


def require_wandb() -> None:
    """One line when --wandb is asked for without the wandb package."""
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb needs the wandb package: pip install 'latentdit[wandb]'")


def flatten(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """Numeric values of a record (nested dicts joined by "/"), under `prefix`/."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}/{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = value
    return out


class WandbRun:
    """One W&B run for one training run folder (resumed by the id in RUN/wandb.json)."""

    def __init__(self, run: Any) -> None:
        self.run = run

    @classmethod
    def start(cls, cfg, run_dir: Path) -> WandbRun:
        """Start (or resume) the W&B run of `run_dir`; writes RUN/wandb.json."""
        require_wandb()
        import wandb

        saved = run_dir / ID_FILE
        known = json.loads(saved.read_text()) if saved.is_file() else {}
        config = {k: v for k, v in asdict(cfg).items() if k not in PRIVATE_CONFIG}
        try:
            run = wandb.init(
                project=known.get("project", cfg.wandb_project),
                name=cfg.wandb_name or known.get("name") or run_dir.resolve().name,
                id=known.get("id"),  # None: a new run, its id saved below
                resume="allow",
                dir=os.environ.get("WANDB_DIR") or str(run_dir),
                config=config,
                allow_val_change=True,
            )
        except Exception as e:  # wandb's own errors (no API key, no network, ...): one line
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(
                f"--wandb: W&B did not start ({reason}); run `wandb login`, or set "
                "WANDB_MODE=offline (then `wandb sync` the run later)"
            ) from None
        run.define_metric(STEP)
        run.define_metric("*", step_metric=STEP)
        tmp = saved.with_name(f".{ID_FILE}.tmp")
        tmp.write_text(json.dumps({"id": run.id, "project": run.project, "name": run.name}))
        os.replace(tmp, saved)
        log.info("W&B run %s (%s) in project %s", run.name, run.id, run.project)
        return cls(run)

    def log(self, record: dict[str, Any], prefix: str) -> None:
        """A log.jsonl record's numbers under `prefix` (train or eval), at its step."""
        rest = {k: v for k, v in record.items() if k != STEP}
        self.run.log({STEP: record[STEP], **flatten(rest, prefix)})

    def image(self, key: str, path: Path, step: int) -> None:
        import wandb

        self.run.log({STEP: step, key: wandb.Image(str(path))})

    def finish(self) -> None:
        self.run.finish()
