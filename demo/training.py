"""What the demo's asset trainers share: the learning-rate schedule and one optimizer step."""

from __future__ import annotations

import logging
import math
import time

import torch

log = logging.getLogger(__name__)

LOG_EVERY = 100  # steps between progress lines
WARMUP_STEPS = 100  # linear learning-rate warmup, then cosine decay to zero


def warmup_cosine(step: int, total: int) -> float:
    """The learning-rate factor at `step` of `total`: linear warmup, then cosine decay to zero."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)))


def optimizer_step(
    opt, sched, loss: torch.Tensor, step: int, total: int, *, batch_size: int, started: float
) -> None:
    """Backpropagate `loss`, step the optimizer and the schedule; every LOG_EVERY steps log the
    loss and the images/s since `started` (a `time.perf_counter()`)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    if step % LOG_EVERY == 0 or step == total - 1:
        rate = (step + 1) * batch_size / (time.perf_counter() - started)
        log.info("step %d/%d loss %.4f (%.0f images/s)", step, total, loss.item(), rate)
