"""All the distributed code: process group from torchrun's variables, per-rank seeds, reductions.

    torchrun --nproc_per_node=8 -m cli encode SRC --out S          # 8 GPUs, NCCL
    torchrun --standalone --nproc_per_node=8 cli.py -- train --store S --run R
    latentdit train --store S --run R                              # 1 process: world size 1

It lives on the ground floor because encode, train and sample all need it; the store's
multi-writer rule (rank 0 creates, a barrier, each rank owns whole shards) is built on it.

A single process also gets a (gloo or NCCL) group of size one, so it runs the same code path as a
multi-process run (DDP, all-reduce, barriers).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from foundation.errors import ConfigError, LatentditError

log = logging.getLogger(__name__)
T = TypeVar("T")

TIMEOUT = datetime.timedelta(minutes=30)  # generous: rank 0 may write a large checkpoint


@dataclass(frozen=True)
class DistInfo:
    """This process's place: rank among world_size, its local rank on the node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """The torch device a `--device` names (None: cuda:LOCAL_RANK when CUDA is there, else cpu).

    ConfigError (one line) for a name torch does not know, or CUDA asked for but not visible.
    """
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {device}: only {torch.cuda.device_count()} CUDA devices are visible"
        )
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device}: latentdit runs on cpu or cuda")
    return dev


def launch_rank() -> int:
    """This process's RANK as torchrun set it (0 without torchrun), with or without a group."""
    return int(os.environ.get("RANK", 0))


def setup_distributed(device: str | None = None, *, tf32: bool = True) -> DistInfo:
    """Join the process group described by torchrun's RANK/WORLD_SIZE/LOCAL_RANK (or make one of size 1).

    NCCL on CUDA, gloo on CPU. `device` overrides the default cuda:LOCAL_RANK / cpu. `tf32`: allow
    TF32 for fp32 matmuls on CUDA (training does; sampling keeps fp32 exact).
    """
    rank = launch_rank()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if local_world > 1 and device is not None and device.strip().startswith("cuda:"):
        raise ConfigError(
            f"--device {device} under torchrun with {local_world} processes per node puts every "
            "rank on that one GPU; give --device cuda (rank r uses cuda:LOCAL_RANK) and choose "
            "GPUs with CUDA_VISIBLE_DEVICES"
        )
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dev.type == "cuda" and tf32:
        # TF32 for the fp32 matmuls outside bf16 autocast, as DiT's train.py does.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=TIMEOUT)
        elif world_size == 1:  # no torchrun: a group of one through an in-memory store
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=TIMEOUT
            )
        else:
            raise RuntimeError("WORLD_SIZE > 1 without MASTER_ADDR: launch with torchrun")
    log.info("rank %d of %d on %s (%s)", rank, world_size, dev, backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: str | None) -> Iterator[DistInfo]:
    """Join torchrun's process group (or make one of size 1); leave it only if it was made here.

    fp32 matmuls stay exact on CUDA (no TF32): for sampling and evaluation, fp32 means fp32.
    """
    made_here = not dist.is_initialized()
    info = setup_distributed(device, tf32=False)
    try:
        yield info
    finally:
        if made_here:
            teardown_distributed()


def seed_everything(seed: int, rank: int) -> None:
    """Seed torch and numpy's global RNGs per rank (data and noise use their own seeded RNGs)."""
    torch.manual_seed(seed * 1000 + rank)
    np.random.seed((seed * 1000 + rank) % 2**32)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over all ranks (a new tensor; `t` is left unchanged)."""
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group if one is set up, else (0, 1); for code (like an
    image source's constructor) that is not handed a DistInfo."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_objects(value) -> list:
    """Every rank's picklable `value`, in rank order; just [value] without a process group."""
    _, world = rank_and_world()
    if world == 1:
        return [value]
    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def rank_range(n: int, rank: int, world: int) -> range:
    """This rank's contiguous run of n items: n // world or one more, in rank order."""
    return range(rank * n // world, (rank + 1) * n // world)


def on_all(fn: Callable[[], T]) -> T:
    """fn() on every rank; a LatentditError raised on any rank is raised on all (the lowest
    rank's), so that no rank waits in a later collective for one that has stopped."""
    result, error = None, None
    try:
        result = fn()
    except LatentditError as e:
        error = e
    errors = [e for e in all_gather_objects(error) if e is not None]
    if errors:
        raise errors[0]
    return result


def on_main(fn: Callable[[], T]) -> T:
    """fn() run on rank 0; its result, or its LatentditError raised, on every rank."""
    result, error = None, None
    if rank_and_world()[0] == 0:
        try:
            result = fn()
        except LatentditError as e:
            error = e
    result, error = all_gather_objects((result, error))[0]
    if error is not None:
        raise error
    return result


def _collective_device() -> torch.device:
    """Where tensors of a collective live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(rows: np.ndarray | None) -> np.ndarray | None:
    """Every rank's rows, concatenated in rank order, on rank 0 (None on the others).

    `rows` (n_r, ...) share their trailing shape and dtype across ranks; None is a rank with
    no rows. Each rank's rows are padded to the longest rank's and all-gathered as one tensor
    (gloo and NCCL alike), so the values arrive bit for bit. Rank 0 gets None if no rank had any.
    """
    rank, world = rank_and_world()
    if world == 1:
        return rows
    shapes = all_gather_objects(None if rows is None else (rows.shape, rows.dtype.str))
    known = [s for s in shapes if s is not None]
    if not known:
        return None
    (_, *tail), dtype = known[0][0], np.dtype(known[0][1])
    assert all((tuple(s[1:]), d) == (tuple(tail), dtype.str) for (s, d) in known), known
    counts = [0 if s is None else s[0][0] for s in shapes]
    padded = torch.zeros((max(counts), *tail), dtype=torch.from_numpy(np.empty(0, dtype)).dtype,
                         device=_collective_device())  # fmt: skip
    if rows is not None and len(rows):
        padded[: len(rows)] = torch.from_numpy(np.ascontiguousarray(rows))
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    if rank != 0:
        return None
    return np.concatenate([p[:c].cpu().numpy() for p, c in zip(parts, counts, strict=True)])


def barrier() -> None:
    dist.barrier()


_cpu_groups: dict[int, tuple[object, object]] = {}  # id(default group) -> (it, its gloo twin)


def cpu_group():
    """A gloo group of all ranks, for collectives on host values that must not wait for a GPU:
    the default group under gloo, else one made on the first call (a collective: every rank must
    make the first call at the same point) and kept while the default group lives."""
    world = dist.group.WORLD
    if dist.get_backend() == "gloo":
        return world
    held = _cpu_groups.get(id(world))
    if held is None or held[0] is not world:
        held = (world, dist.new_group(backend="gloo"))
        _cpu_groups.clear()
        _cpu_groups[id(world)] = held
    return held[1]


def start_max_over_ranks(value: int) -> Callable[[], int]:
    """Start the all-reduce (max over all ranks) of `value` on the CPU group (gloo) in the
    background; returns the call that waits for it and gives the result. A collective: every
    rank starts it. It never synchronizes a device."""
    t = torch.tensor([value], dtype=torch.int64)
    work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=cpu_group(), async_op=True)

    def result() -> int:
        work.wait()
        return int(t.item())

    return result


def max_over_ranks(value: int) -> int:
    """The largest `value` over all ranks, all-reduced on the CPU (one small message round)."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=cpu_group())
    return int(t.item())


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's value of `flag`, on every rank."""
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


@torch.no_grad()
def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers, in place on every rank (what DDP does to the module it
    wraps); nothing without a process group of several ranks."""
    if rank_and_world()[1] == 1:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t, src=0)
