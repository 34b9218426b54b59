"""Training metrics: loss and its terms (all-reduced), throughput and MFU, to RUN/log.jsonl, tqdm
and TensorBoard. A record holds "loss" and one "loss_<term>" per named term of the objective's
loss (e.g. "loss_mse", "loss_vlb"), each the mean over the steps since the last record and ranks.

MFU = (3 x forward FLOPs per image) x images/s per device / the device's peak FLOP/s; forward plus
backward costs about three forwards (Kaplan et al. 2020). FLOPs come from the model config
(`trainer.model.forward_flops`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from foundation.distributed import DistInfo, all_reduce_mean
from trainer.cost import RunCost
from trainer.wandb_log import WandbRun

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward ~= 3 forwards
# Dense bf16 peak TFLOP/s from NVIDIA's datasheets; matched against torch.cuda.get_device_name.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1}


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the override, a known GPU's bf16 figure, or None (unknown)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if key in name:
            return tflops * 1e12
    return None


def mfu(forward_flops: float, images_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilization of one device, or None when its peak is unknown."""
    if peak is None:
        return None
    return TRAIN_FLOPS_PER_FORWARD * forward_flops * images_per_s_per_device / peak


def trim_log(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class TrainLogger:
    """Accumulates per-step values; every `log_every` steps reduces them and writes one record.

    Call `update` on every rank (the loss is all-reduced); only rank 0 writes and shows tqdm.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        dist: DistInfo,
        start_step: int,
        total_steps: int,
        log_every: int,
        global_batch: int,
        forward_flops: float,
        peak: float | None,
        cost: RunCost | None = None,
        wandb_cfg=None,
    ) -> None:
        self.dist, self.total, self.every = dist, total_steps, log_every
        self.batch, self.flops, self.peak = global_batch, forward_flops, peak
        self.path = run_dir / LOG_FILE
        self.bar = self.tb = self.wandb = None
        self.cost = cost  # trainer.cost: images seen, epochs, wall time, device-hours, milestones
        if dist.is_main:
            trim_log(self.path, start_step)
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            self.tb = _tensorboard(run_dir)
            self.wandb = wandb_cfg and WandbRun.start(wandb_cfg, run_dir)  # --wandb
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.dist.device)
        self.term_sums: dict[str, torch.Tensor] = {}
        self.steps, self.data_s, self.t0 = 0, 0.0, time.perf_counter()
        self.carried = 0  # steps of this interval done before a resume (`carry`)

    def interval(self) -> dict[str, Any]:
        """The open interval (steps since the last record) of this rank, for a checkpoint: what
        a resume needs to write the next record as an uninterrupted run would."""
        return {
            "loss_sum": self.loss_sum.detach().cpu(),
            "terms": {k: torch.as_tensor(v).detach().cpu() for k, v in self.term_sums.items()},
            "steps": self.steps + self.carried,
        }

    def carry(self, loss_sum: torch.Tensor, terms: dict[str, torch.Tensor], steps: int) -> None:
        """Continue an interval a checkpoint saved (`interval`): its sums are added to, and its
        steps count in the next record's means (not in its throughput: they ran before)."""
        self.loss_sum = loss_sum.to(self.dist.device)
        self.term_sums = {k: v.to(self.dist.device) for k, v in terms.items()}
        self.carried = steps

    def update(
        self,
        step: int,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        lr: float,
        data_s: float,
        terms: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, Any] | None:
        """Record step `step` (1-based count of finished steps) and its loss terms; returns the
        record when one is written."""
        self.loss_sum += loss
        for name, value in (terms or {}).items():
            self.term_sums[name] = self.term_sums.get(name, 0) + value
        self.steps, self.data_s = self.steps + 1, self.data_s + data_s
        if self.bar is not None:
            self.bar.update(1)
        if step % self.every and step != self.total:
            return None
        names = sorted(self.term_sums)
        sums = torch.stack([self.loss_sum, *(self.term_sums[n] for n in names)])
        means = all_reduce_mean(sums / (self.steps + self.carried)).tolist()  # waits for the device
        elapsed = time.perf_counter() - self.t0
        images_per_s = self.steps * self.batch / elapsed
        record = {
            "step": step,
            "loss": means[0],
            **{f"loss_{name}": value for name, value in zip(names, means[1:], strict=True)},
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "steps_per_s": self.steps / elapsed,
            "images_per_s": images_per_s,
            "mfu": mfu(self.flops, images_per_s / self.dist.world_size, self.peak),
            "data_fraction": self.data_s / elapsed,
        }
        if self.cost is not None:
            record |= self.cost.train_fields(step, images_per_s)
        self._reset()
        if self.dist.is_main:
            self._write(record)
        return record

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
        if self.wandb is not None:
            self.wandb.log(record, "train")

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """Append an evaluation record {"step", "eval": true, fid, ...} and its scalars (rank 0;
        the other ranks' calls do nothing)."""
        if not self.dist.is_main:
            return
        record = {"step": step, "eval": True, **metrics}
        if self.cost is not None:
            record |= self.cost.eval_fields(step, metrics)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"eval/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(record, "eval")

    def log_image(self, key: str, path: Path | None, step: int) -> None:
        """An image file (e.g. an EMA sample grid) to W&B, when --wandb is on (rank 0)."""
        if self.wandb is not None and path is not None:
            self.wandb.image(key, path, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def saved_activation_bytes(model: torch.nn.Module, *args: Any) -> int:
    """Bytes of the distinct tensors autograd keeps for backward after one `model(*args)`.

    A real count (saved_tensors_hooks), for devices without an allocator to ask (the CPU):
    parameters are left out; blocks that recompute keep only their inputs, which the checkpoint
    holds itself (not counted here: one (B, T, D) tensor per block).
    """
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*args)
    return sum(seen.values())
