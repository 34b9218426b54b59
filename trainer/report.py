"""A run's report from its folder alone: `latentdit inspect RUN` and the end of `latentdit train`.

    latentdit inspect runs/dit-b2          # finished or still running
    latentdit inspect runs/dit-b2 --json

From RUN/config.json and RUN/log.jsonl (the cost fields of `trainer.cost`): status, step, images
seen, epochs, wall time, device-hours, images/s per device (while training, and over the whole
wall time), MFU, the last loss, the FID curve and the first step and epoch below each
--eval-milestones threshold, and the latest checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.checkpoint import CHECKPOINTS, latest_checkpoint
from trainer.cost import FID_KEY, first_below, read_records
from trainer.metrics import LOG_FILE
from trainer.run_dir import CONFIG_FILE


def is_run_dir(path: str | Path) -> bool:
    """A local training run folder: config.json with a log or checkpoints (a store has zarr.json)."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and ((p / LOG_FILE).is_file() or (p / CHECKPOINTS).is_dir())


def _milestones(config: dict[str, Any]) -> tuple[float, ...]:
    text = config.get("eval_milestones") or ""
    return tuple(float(t) for t in str(text).split(",") if t.strip())


def _training_time(train: list[dict[str, Any]]) -> tuple[float, float, float | None]:
    """(images, seconds, time-weighted MFU) over the logged intervals of training steps."""
    images = seconds = mfu_s = 0.0
    previous = 0
    for r in train:
        steps = r["step"] - previous if r["step"] > previous else 0
        previous = r["step"]
        if not steps or not r.get("steps_per_s"):
            continue
        s = steps / r["steps_per_s"]
        images += r.get("images_per_s", 0.0) * s
        seconds += s
        mfu_s += (r.get("mfu") or 0.0) * s
    with_mfu = any(r.get("mfu") is not None for r in train)
    return images, seconds, (mfu_s / seconds if with_mfu and seconds else None)


def run_report(run: str | Path) -> dict[str, Any]:
    """What the run folder says of the run (see the module docstring)."""
    run = Path(run)
    config = json.loads((run / CONFIG_FILE).read_text())
    records = read_records(run / LOG_FILE)
    train = [r for r in records if not r.get("eval")]
    evals = [r for r in records if r.get("eval")]
    last = max(records, key=lambda r: (r["step"], r.get("wall_s", 0.0)), default={})
    step = last.get("step", 0)
    devices = last.get("devices")
    images, seconds, mfu = _training_time(train)
    latest = latest_checkpoint(run)
    curve = [{"step": r["step"], "epoch": r.get("epoch"), FID_KEY: r.get(FID_KEY)} for r in evals]
    target = config.get("steps")
    return {
        "run": str(run),
        "status": "finished" if target is not None and step >= target else "running or stopped",
        "step": step,
        "steps": target,
        "images_seen": last.get("images_seen", step * config.get("batch_size", 0)),
        "epoch": last.get("epoch"),
        "wall_s": last.get("wall_s"),
        "device_hours": last.get("device_hours"),
        "devices": devices,
        "images_per_s_per_device": images / seconds / devices if seconds and devices else None,
        "images_per_s_per_device_overall": (
            last["images_seen"] / (last["device_hours"] * 3600)
            if last.get("device_hours") and "images_seen" in last
            else None
        ),
        "mfu": mfu,
        "loss": train[-1].get("loss") if train else None,
        "fid_curve": curve,
        "milestones": first_below(curve, _milestones(config)),
        "checkpoint": None if latest is None else str(latest),
    }


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    h, rest = divmod(int(seconds), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_report(r: dict[str, Any]) -> str:
    """The report as aligned lines."""
    lines = [
        f"run          {r['run']}: {r['status']} at step {r['step']} of {r['steps']}",
        f"seen         {r['images_seen']:,} images, {_num(r['epoch'], '.2f')} epochs",
        f"time         {_hours(r['wall_s'])} wall, {_num(r['device_hours'], '.3f')} "
        f"device-hours on {r['devices'] or 'n/a'} device(s)",
        f"throughput   {_num(r['images_per_s_per_device'], ',.1f')} images/s per device while "
        f"training, {_num(r['images_per_s_per_device_overall'], ',.1f')} over the wall time; "
        f"MFU {'n/a' if r['mfu'] is None else format(r['mfu'], '.1%')}",
        f"loss         {_num(r['loss'], '.4f')}",
    ]
    if r["fid_curve"]:
        curve = ", ".join(f"{p['step']}: {_num(p[FID_KEY], '.4g')}" for p in r["fid_curve"])
        lines.append(f"FID          {curve}")
    for threshold, hit in r["milestones"].items():
        when = (
            "not yet" if hit is None else f"step {hit['step']}, epoch {_num(hit['epoch'], '.2f')}"
        )
        lines.append(f"FID < {threshold:<6} {when}")
    lines.append(f"checkpoint   {r['checkpoint']}")
    return "\n".join(lines)
