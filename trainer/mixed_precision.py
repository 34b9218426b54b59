"""bf16 weights for the forward, fp32 master weights for everything else (`--bf16-weights`).

    compute = bf16_compute_copy(model)           # what DDP wraps and the forward runs
    ddp.register_comm_hook(MasterGradients(compute, model), MasterGradients.hook)
    ... backward: each bucket is all-reduced in fp32 and lands in the masters' .grad ...
    clip, AdamW and the EMA on `model` (fp32), then refresh_compute(compute, model)

Under bf16 autocast every linear layer casts its fp32 weight and bias to bf16 on every call (and
its gradient back to fp32); here the forward's linear layers hold bf16 parameters, so those casts
disappear. The bf16 weights are exactly what autocast would have made (round to nearest of the
same fp32 master), and the gradients reach the masters as autocast's do: a bf16 GEMM's result,
widened to fp32, averaged over ranks in fp32. Other parameters (LayerNorm affines, embeddings)
stay fp32 as autocast leaves them. Checkpoints hold the masters: the format does not change.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

COMPUTE_DTYPE = torch.bfloat16
CAST_MODULES = (nn.Linear,)  # the layers autocast casts per call


def bf16_compute_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose linear layers hold bf16 parameters (the rest as in `model`)."""
    import copy

    compute = copy.deepcopy(model)
    for module in compute.modules():
        if isinstance(module, CAST_MODULES):
            module.to(COMPUTE_DTYPE)
    return compute


@torch.no_grad()
def refresh_compute(compute: nn.Module, master: nn.Module) -> None:
    """compute's parameters = master's, rounded to their dtypes (one foreach copy)."""
    torch._foreach_copy_(list(compute.parameters()), list(master.parameters()))


class MasterGradients:
    """State of the DDP comm hook that averages each bucket in fp32 into the masters' .grad.

    A bucket holds bf16 gradients of the compute copy (and fp32 ones of its fp32 parameters).
    The hook widens it to fp32, adds the earlier micro-batches' gradients (`accumulate`), divides
    by the world size and all-reduces (as DDP's default hook does in fp32), then points each
    master parameter's .grad at its slice of the result (no copy;
    `optimizer.zero_grad(set_to_none=True)` frees it). DDP gets the average back in the bucket's
    dtype. So the masters see autocast's gradients bit for bit: sums in fp32 of bf16 results.
    """

    def __init__(self, compute: nn.Module, master: nn.Module, group=None) -> None:
        self.pairs = list(zip(compute.parameters(), master.parameters(), strict=True))
        self.master_of = {id(c): m for c, m in self.pairs}
        self.group = group

    @torch.no_grad()
    def accumulate(self) -> None:
        """After a micro-batch's backward under `no_sync`: move its gradients into the masters'
        fp32 .grad (summed there, as autocast's fp32 gradients are), and clear the copy's."""
        for c, m in self.pairs:
            if m.grad is None:
                m.grad = c.grad.to(torch.float32, copy=True)
            else:
                m.grad.add_(c.grad)
            c.grad = None

    @staticmethod
    def hook(state, bucket):  # unannotated: DDP checks annotations, and these would be strings
        """(MasterGradients, dist.GradBucket) -> Future of the averaged bucket."""
        buffer = bucket.buffer()
        grads = buffer.to(torch.float32, copy=True)
        offset = 0
        for param in bucket.parameters():  # the flat bucket: its parameters' gradients in order
            n, earlier = param.numel(), state.master_of[id(param)].grad
            if earlier is not None:  # micro-batches before this one (`accumulate`)
                grads[offset : offset + n] += earlier.flatten()
            offset += n
        grads.div_(dist.get_world_size(state.group))
        work = dist.all_reduce(grads, group=state.group, async_op=True)

        def scatter(fut: torch.futures.Future) -> torch.Tensor:
            reduced = fut.value()[0]
            offset = 0
            for param in bucket.parameters():
                n = param.numel()
                state.master_of[id(param)].grad = reduced[offset : offset + n].view_as(param)
                offset += n
            return reduced.to(buffer.dtype)

        return work.get_future().then(scatter)
