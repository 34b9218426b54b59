"""What a training run saves and restores beyond the model to stop anywhere and resume exactly.

    with StopSignals() as stop:                 # foundation.preemption
        for step in ...:
            ...
            if signum := stop.agreed(overlap=True):  # every rank, every step
                save(..., logger=logger)        # trainer.train: with gather_log_interval
                raise preempted(signum, run, done, dist)

A checkpoint taken between two log records (on a signal, or a --ckpt-every that is not a
multiple of --log-every) also holds each rank's open log interval: the loss summed over the
steps since the last record. A resume with the same number of ranks continues those sums, so
the next record of log.jsonl is the one an uninterrupted run writes, bit for bit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from foundation.distributed import DistInfo, all_gather_objects
from foundation.preemption import Preempted, stopped
from trainer.checkpoint import latest_checkpoint
from trainer.metrics import TrainLogger

log = logging.getLogger(__name__)


def gather_log_interval(logger: TrainLogger) -> dict[str, Any]:
    """Every rank's open log interval, for rank 0's checkpoint: {"loss_sum": (world,) tensor in
    rank order, "terms": {name: (world,) tensor}, "steps": n}. A collective: every rank calls it."""
    parts = all_gather_objects(logger.interval())
    terms = {k: torch.stack([p["terms"][k] for p in parts]) for k in parts[0]["terms"]}
    loss_sum = torch.stack([p["loss_sum"] for p in parts])
    return {"loss_sum": loss_sum, "terms": terms, "steps": parts[0]["steps"]}


def carry_log_interval(logger: TrainLogger, saved: dict[str, Any] | None, dist: DistInfo) -> None:
    """Continue the open log interval of the checkpoint resumed from (if it has one)."""
    if not saved or not saved["steps"]:
        return
    sums = saved["loss_sum"]
    if len(sums) != dist.world_size:
        log.info(
            "the checkpoint's last %d steps ran on %d ranks, now %d: the next log record averages "
            "only the steps after the resume",
            saved["steps"], len(sums), dist.world_size,
        )  # fmt: skip
        return
    terms = {k: v[dist.rank] for k, v in saved.get("terms", {}).items()}
    logger.carry(sums[dist.rank], terms, int(saved["steps"]))


def preempted(signum: int, run: Path, step: int, dist: DistInfo) -> Preempted:
    """The exit of a run stopped by `signum` after writing the checkpoint of `step` (one log line,
    on rank 0)."""
    what = (
        f"stopped after step {step}; checkpoint {latest_checkpoint(run)} written; resume with "
        f"the same command (or `latentdit train --run {run}`)"
    )
    return stopped(signum, what, main=dist.is_main)
