"""What every solver shares: the types of its signature, the flow time grid, the step report.

ts = flow_times(50, shift=3.0)      # float64, 1 (noise) -> 0 (data)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""model_fn(x, t) -> prediction; REPA's solvers also pass `guide_at=` (see `sampler.guidance`)."""
NoiseFn = Callable[[Tensor], Tensor]
Callback = Callable[[dict], None]


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23); s > 1 spends more steps near noise."""
    return shift * t / (1 + (shift - 1) * t)


def flow_times(steps: int, shift: float = 1.0, last_step: float | None = None) -> Tensor:
    """steps + 1 times from 1 (noise) down to 0 (data), uniform in t before the shift; float64.

    With `last_step` = h, the first steps - 1 steps are uniform from 1 down to h and the last one
    goes from h to 0 (SiT's SDE sampler: `--last-step-size`, 0.04 by default).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if last_step is None or steps == 1:
        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    else:
        ts = torch.cat([torch.linspace(1.0, last_step, steps, dtype=torch.float64), torch.zeros(1)])
    return shift_time(ts.double(), shift)


def batch_time(x: Tensor, t: float) -> Tensor:
    """t as a (B,) tensor in x's dtype and device: the time a solver passes to model_fn."""
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def report(callback: Callback | None, i: int, t: float, x: Tensor, pred: Tensor) -> None:
    """Call `callback` (if any) with {"i", "t", "x", "pred"} after a step."""
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "pred": pred})
