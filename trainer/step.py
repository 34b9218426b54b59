"""One optimizer step, and the pieces it needs: AdamW, the LR schedule, EMA, autocast, DDP wrapping.

`train_step` is the real step: the training loop and `bench/bench_train.py` both call it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from foundation.compile import uses_cuda_graphs
from foundation.distributed import DistInfo, broadcast_module
from foundation.errors import ConfigError
from foundation.precision import Precision, autocast, resolve_precision
from trainer.config import TrainConfig
from trainer.data import Batch, BatchLayout
from trainer.mixed_precision import MasterGradients, bf16_compute_copy, refresh_compute
from trainer.model import DiT
from trainer.objective import Objective, drop_labels
from trainer.repa import Alignment

NOISE_STREAM = 2  # RNG stream tag of the per-step noise, apart from the data streams


class StepResult(NamedTuple):
    """What a step reports, as 0-dim tensors on the device, not synchronized: this rank's mean
    loss, the global grad norm before clipping, and the loss's named terms (means)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    terms: dict[str, torch.Tensor]


@dataclass
class Trainee:
    """What a step changes: the raw model (fp32, what checkpoints hold), its DDP wrapper, the
    forward to call (DDP, maybe compiled), the EMA and the optimizer; `compute` is the module
    DDP wraps: `model` itself, or its bf16 copy (--bf16-weights, trainer.mixed_precision)."""

    model: DiT
    ddp: DistributedDataParallel
    forward: nn.Module
    ema: DiT
    optimizer: torch.optim.Optimizer
    compute: DiT
    master_grads: MasterGradients | None = None

    @property
    def kept_copy(self) -> bool:
        return self.compute is not self.model

    def sync_compute(self) -> None:
        """After the masters changed (a step, a resume): the bf16 copy follows them."""
        if self.kept_copy:
            refresh_compute(self.compute, self.model)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where the device supports it (CUDA, and CPU in recent PyTorch)."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=cfg.adam_betas,
        weight_decay=cfg.weight_decay,
        fused=fused,
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then constant, or a cosine down to cfg.min_lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if not cfg.cosine_decay:
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_ema(model: DiT) -> DiT:
    """A frozen copy of the model that `update_ema` moves towards the trained weights."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, parameter by parameter."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def make_trainee(model: DiT, cfg: TrainConfig, dist: DistInfo) -> Trainee:
    """Wrap the model in DDP (torch.compile'd as `cfg.compile_scope` says), with an EMA and AdamW.

    The raw `model` stays what checkpoints save (no `module.` or `_orig_mod.` prefixes): scope
    "blocks" compiles each block in place (`nn.Module.compile`), which leaves the state dict alone.
    DDP all-reduces gradient buckets of `cfg.ddp_bucket_mb` as backward produces them. With
    `cfg.bf16_weights` DDP wraps a bf16 copy instead, whose buckets a comm hook averages in fp32
    into the masters' gradients; AdamW, clipping and the EMA keep to the fp32 `model`.
    """
    if cfg.bf16_weights and resolve_precision(cfg.precision, dist.device) is not Precision.bf16:
        raise ConfigError(
            f"--bf16-weights needs bf16 compute; --precision {cfg.precision} is fp32 on "
            f"{dist.device.type}: give --precision bf16, or drop --bf16-weights"
        )
    # The ranks were seeded apart, so their inits differ: rank 0's weights everywhere before the
    # EMA and the bf16 copy are made (DDP's own broadcast reaches only the module it wraps).
    broadcast_module(model)
    ema = make_ema(model)  # an eager copy, made before any block is compiled
    compute = bf16_compute_copy(model) if cfg.bf16_weights else model
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    if cfg.compile and cfg.compile_scope == "blocks":
        for block in compute.transformer_blocks:  # the trunk's and the DDT head's
            block.compile(fullgraph=True, dynamic=False, mode=mode)
    ddp = DistributedDataParallel(
        compute,
        device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
        bucket_cap_mb=cfg.ddp_bucket_mb,
        gradient_as_bucket_view=cfg.grad_as_bucket_view,
    )
    master_grads = MasterGradients(compute, model) if compute is not model else None
    if master_grads is not None:
        ddp.register_comm_hook(master_grads, MasterGradients.hook)
    whole = cfg.compile and cfg.compile_scope == "model"
    forward = torch.compile(ddp, mode=mode) if whole else ddp
    optimizer = build_optimizer(model, cfg, dist.device)
    return Trainee(
        model=model, ddp=ddp, forward=forward, ema=ema, optimizer=optimizer, compute=compute,
        master_grads=master_grads,
    )  # fmt: skip


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
SDPA_BACKENDS |= {"efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    """Inside, F.scaled_dot_product_attention uses only the named backend ("auto": any)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])


def step_generator(seed: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-step's noise, times and label dropout: a function of its position.

    Every rank seeds it alike and keeps its own rows of the draws (see trainer.objective), so
    noise depends on (seed, step, micro) only: resuming needs no generator state.
    """
    seed_int = int(np.random.SeedSequence([seed, NOISE_STREAM, step, micro]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed_int)


def train_step(
    trainee: Trainee,
    objective: Objective | Alignment,
    batches: list[Batch],
    *,
    step: int,
    lr: float,
    cfg: TrainConfig,
    layout: BatchLayout,
    device: torch.device,
) -> StepResult:
    """Forward, backward (accumulating over micro-batches), clip, AdamW, EMA (and with
    --bf16-weights the bf16 copy refreshed from the updated masters), on named batches
    (`trainer.data`); `objective` is the run's, or its REPA loss (`trainer.repa.Alignment`).

    Returns this rank's mean loss, the global grad norm before clipping and the loss's mean
    terms, on the device and not synchronized (so the caller decides when to wait for it).
    """
    trainee.forward.train()
    if cfg.compile and uses_cuda_graphs(cfg.compile_mode):  # reduce-overhead, max-autotune
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graph outputs of the last step: dead
    total = torch.zeros((), device=device)
    terms: dict[str, torch.Tensor] = {}
    for micro, batch in enumerate(batches):
        g = step_generator(cfg.seed, step, micro, device)
        rows = {"offset": layout.rank_offset(), "total": layout.rows_per_micro}
        y = drop_labels(batch["labels"], cfg.p_uncond, trainee.model.null_class, g, **rows)
        last = micro == len(batches) - 1
        with contextlib.nullcontext() if last else trainee.ddp.no_sync():
            with (
                autocast(device, resolve_precision(cfg.precision, device)),
                attention_backend(cfg.attention),
            ):
                loss = objective.batch_loss(trainee.forward, batch, y, g, **rows)
            (loss.value / len(batches)).backward()
        if trainee.kept_copy and not last:
            trainee.master_grads.accumulate()
        total += loss.value.detach() / len(batches)
        for name, value in loss.terms.items():
            terms[name] = terms.get(name, 0) + value.detach() / len(batches)
    max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
    with record_function("grad_clip"):  # labels for bench/profile_train.py's kernel classes
        grad_norm = torch.nn.utils.clip_grad_norm_(trainee.model.parameters(), max_norm)
    for group in trainee.optimizer.param_groups:
        group["lr"] = lr
    with record_function("optimizer"):
        trainee.optimizer.step()
        trainee.optimizer.zero_grad(set_to_none=True)
        if trainee.kept_copy:
            trainee.compute.zero_grad(set_to_none=True)
            trainee.sync_compute()
    with record_function("ema"):
        update_ema(trainee.ema, trainee.model, cfg.ema_decay)
    return StepResult(total, grad_norm, terms)
