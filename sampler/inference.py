"""A DiT prepared for sampling: optionally compiled with static shapes, optionally with cast weights.

    net = InferenceModel(model, compile="reduce-overhead", weights_dtype=torch.bfloat16)
    z = make_latents(net, objective, labels, noise, SolveConfig(cfg=4), ...)

`make_latents` calls it like the DiT, (x, t, y) -> prediction, with t a (B,) tensor, so a compiled
forward sees the same shapes and dtypes at every step and never recompiles across steps. It sees
at most two batch shapes per batch size: 2B rows (guided) and B rows (outside the guidance
interval, or cfg = 1). Compiled outputs match eager ones to float rounding, not bit for bit; with
`weights_dtype` the weights are cast once (half the memory, no per-call weight casts under
autocast), which also rounds the label embedding: within bf16 tolerance of autocast, not equal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from foundation.compile import uses_cuda_graphs
from sampler.config import COMPILE_MODES
from trainer.model import DiT


class InferenceModel:
    """Call a DiT, compiled or not, with its weights in `weights_dtype` (default: as they are)."""

    def __init__(
        self, model: DiT, *, compile: str | None = None, weights_dtype: torch.dtype | None = None
    ) -> None:
        if compile is not None and compile not in COMPILE_MODES:
            raise ValueError(f"compile mode {compile!r} is not one of {COMPILE_MODES}")
        if weights_dtype is not None:
            model = model.to(weights_dtype)
        self.model = model.eval().requires_grad_(False)
        self.null_class, self.config = model.null_class, model.config
        self.cuda_graphs = compile is not None and uses_cuda_graphs(compile)
        self.forward = (
            model if compile is None else torch.compile(model, mode=compile, dynamic=False)
        )

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        if self.cuda_graphs:  # a new replay: the previous outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        out = self.forward(x, t, y)
        return out.clone() if self.cuda_graphs else out
