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
    """
    null = torch.full_like(y, null_class)

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        inside = None if interval is None else (t >= interval[0]) & (t <= interval[1])
        if scale == 1.0 or (inside is not None and not bool(inside.any())):  # reads a flag back
            return net_fn(x, t, y)
        out = net_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        mixed = uncond + scale * (cond - uncond)
        if channels is not None:
            mixed = torch.cat([mixed[:, :channels], cond[:, channels:]], dim=1)
        if inside is None:
            return mixed
        return torch.where(inside.view(-1, *[1] * (x.dim() - 1)), mixed, cond)

    return model_fn
