"""What a training run has cost so far, written into every log.jsonl record as the run goes.

    cost = RunCost.resume(run / "log.jsonl", start_step=start, global_batch=256,
                          steps_per_epoch=5004, world_size=8, milestones=(10, 5, 2))
    record |= cost.train_fields(step, images_per_s)        # a training record
    record |= cost.eval_fields(step, metrics)              # an evaluation record

Training records gain `images_seen` (finished steps x global batch), `epoch` (steps / steps per
epoch, fractional), `devices` (this call's world size), `wall_s` (the run's wall time: every call that trained it, resumes included,
from the call's start: loading the store and model counts), `device_hours` (the sum over calls of
devices x their wall time) and `images_per_s_per_device` (over the record's interval). Evaluation
records gain the same clock fields and `milestones`: for each FID threshold of --eval-milestones,
the step and epoch of the first evaluation whose FID fell below it (null while none has). A
resumed call starts from the last record at or before its checkpoint's step; time spent on steps
that a crash threw away (after the last checkpoint) is not counted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECONDS_PER_HOUR = 3600.0
FID_KEY = "fid"
COST_CLOCK = ("wall_s", "device_hours", "images_per_s_per_device")  # the fields of wall-clock time


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a log.jsonl, skipping any line that does not parse (a write torn by a
    kill leaves at most the last one); [] when there is no log."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def milestone_key(threshold: float) -> str:
    """A threshold as a JSON key: 10.0 -> "10", 2.5 -> "2.5"."""
    return f"{threshold:g}"


def first_below(curve: list[dict[str, Any]], thresholds: tuple[float, ...]) -> dict[str, Any]:
    """{threshold: {"step", "epoch"} of the first point of the FID curve below it, or None}."""
    out: dict[str, Any] = {}
    for threshold in thresholds:
        hit = next(
            (p for p in curve if p.get(FID_KEY) is not None and p[FID_KEY] < threshold), None
        )
        out[milestone_key(threshold)] = hit and {"step": hit["step"], "epoch": hit.get("epoch")}
    return out


@dataclass
class RunCost:
    """The run's cost clock and FID curve (one per training call; rank 0's writes the log)."""

    global_batch: int
    steps_per_epoch: int
    world_size: int
    milestones: tuple[float, ...] = ()
    prior_wall_s: float = 0.0
    prior_device_hours: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    curve: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def resume(cls, log: Path, *, start_step: int, started: float | None = None,
               **kw: Any) -> RunCost:  # fmt: skip
        """The clock and curve of the records at or before `start_step` (0: a new run)."""
        kept = [r for r in read_records(log) if r["step"] <= start_step] if start_step else []
        timed = [r for r in kept if "wall_s" in r]
        last = max(timed, key=lambda r: (r["step"], r["wall_s"])) if timed else {}
        curve = [{"step": r["step"], "epoch": r.get("epoch"), FID_KEY: r.get(FID_KEY)}
                 for r in kept if r.get("eval")]  # fmt: skip
        return cls(prior_wall_s=last.get("wall_s", 0.0),
                   prior_device_hours=last.get("device_hours", 0.0),
                   started=time.perf_counter() if started is None else started, curve=curve, **kw)  # fmt: skip

    def clock(self, step: int) -> dict[str, Any]:
        """images_seen, epoch, devices (of this call), wall_s and device_hours at finished step
        `step`, now."""
        call_s = time.perf_counter() - self.started
        return {
            "images_seen": step * self.global_batch,
            "epoch": step / self.steps_per_epoch,
            "devices": self.world_size,
            "wall_s": self.prior_wall_s + call_s,
            "device_hours": self.prior_device_hours + self.world_size * call_s / SECONDS_PER_HOUR,
        }

    def train_fields(self, step: int, images_per_s: float) -> dict[str, Any]:
        """The cost fields of a training record (images_per_s: global, over its interval)."""
        return {**self.clock(step), "images_per_s_per_device": images_per_s / self.world_size}

    def eval_fields(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """The cost fields and milestones of an evaluation record; extends the FID curve."""
        fields = self.clock(step)
        self.curve.append({"step": step, "epoch": fields["epoch"], FID_KEY: metrics.get(FID_KEY)})
        return {**fields, "milestones": first_below(self.curve, self.milestones)}
