"""Process-group setup from torchrun's variables; world size 1 runs the same code path.

    torchrun --nproc_per_node=8 -m cli encode ...

gloo on CPU, NCCL on GPUs. Rank 0 does the one-process work (creating the store, finalizing it)
and shares its outcome with `broadcast_error`, so a failure there stops every rank cleanly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from latent_store import LatentditError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group if there is one; pick this rank's device.

    device: "cpu", "cuda" or None (CUDA when available). Under torchrun each rank takes the GPU
    of its LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def broadcast_error(info: DistInfo, error: LatentditError | None) -> None:
    """Raise on every rank the error rank 0 met (or nothing if it met none)."""
    if info.world_size > 1:
        message = [str(error) if error is not None else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and error is None:
            raise LatentditError(message[0])
    if error is not None:
        raise error


def all_reduce_sum(info: DistInfo, value: int) -> int:
    """Sum an integer over all ranks."""
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group if one is set up, else (0, 1); for code (like a
    source's constructor) that is not handed a DistInfo."""
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


def shutdown(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
