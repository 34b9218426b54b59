"""Classifier-free guidance as a wrapper around a class-conditional model function.

    model_fn = guided(net_fn, labels, scale=4.0, null_class=num_classes, interval=(0.0, 0.7))
    x0 = sample_heun(model_fn, noise, steps=50)

Guidance acts on every output channel: uncond + s (cond - uncond) (Ho & Salimans 2022); s = 1
is the conditional model alone, with no unconditional pass. `channels=3` guides only the first 3
channels and keeps the conditional prediction on the rest: what the published DiT and SiT
numbers used (their `forward_with_cfg`, "for exact reproducibility"), not a recommendation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sampler.solvers import ModelFn

ClassModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, t, y) -> prediction


def guided(
    net_fn: ClassModelFn,
    y: Tensor,
    *,
    scale: float = 1.0,
    null_class: int,
    interval: tuple[float, float] | None = None,
    channels: int | None = None,
) -> ModelFn:
    """Bind labels `y` (B,) to `net_fn` and apply guidance of strength `scale`.

    Conditional and unconditional predictions come from one batched forward of 2B rows. With
    `interval` = (lo, hi), guidance applies only where lo <= t <= hi (t in the solver's time; the
    limited interval of Kynkäänniemi et al. 2024), elsewhere the conditional prediction is used,
    and steps with no row inside the interval skip the unconditional rows (deciding that reads
    one flag back from the device per call; without an interval nothing is read back, so the
    host queues work ahead of the device). With `channels` = N, only output channels :N are
    guided; the others stay conditional.

    The returned `model_fn(x, t, *, guide_at=None)` decides the interval per row at t; given
    `guide_at` (a time in the same units) it decides once for the whole batch at that time, as
    REPA's samplers do at each step's start, for their Heun corrector too (`sampler.repa_solvers`).
    """
    null = torch.full_like(y, null_class)

    def both(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(guided, conditional) from one forward of 2B rows."""
        out = net_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        mixed = uncond + scale * (cond - uncond)
        if channels is not None:
            mixed = torch.cat([mixed[:, :channels], cond[:, channels:]], dim=1)
        return mixed, cond

    def model_fn(x: Tensor, t: Tensor, *, guide_at: float | None = None) -> Tensor:
        if guide_at is not None:  # one decision for the batch, by the solver: nothing read back
            inside = interval is None or interval[0] <= guide_at <= interval[1]
            return both(x, t)[0] if inside and scale != 1.0 else net_fn(x, t, y)
        inside = None if interval is None else (t >= interval[0]) & (t <= interval[1])
        if scale == 1.0 or (inside is not None and not bool(inside.any())):  # reads a flag back
            return net_fn(x, t, y)
        mixed, cond = both(x, t)
        if inside is None:
            return mixed
        return torch.where(inside.view(-1, *[1] * (x.dim() - 1)), mixed, cond)

    return model_fn
