"""The next step's batch, made while this step runs: gather, copy and dequantize overlapped.

    data = Prefetcher(build_batches(...), device)
    batches = data.get(epoch, step)       # made ahead by the last `prefetch`, or now
    train_step(...)                        # launched: the GPU is busy
    data.prefetch(epoch, step + 1)         # the host gathers step + 1 meanwhile

On a GPU the prefetched batch is made on a side stream, so its copy and dequantize kernels run
beside the step's kernels, and the main stream waits for them only when it uses the batch. The
batches are exactly those the wrapped source gives (its `get` is a pure function of the position).
"""

from __future__ import annotations

import torch

from trainer.data import Batch


class Prefetcher:
    """Wraps a batch source (`get(epoch, step)`, `steps_per_epoch`) to make one step ahead."""

    def __init__(self, source, device: torch.device) -> None:
        self.source, self.steps_per_epoch = source, source.steps_per_epoch
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ahead: tuple[tuple[int, int], list[Batch]] | None = None

    def prefetch(self, epoch: int, step: int) -> None:
        """Start making the batches of (epoch, step); `step` may run past the epoch's end."""
        epoch, step = divmod(epoch * self.steps_per_epoch + step, self.steps_per_epoch)
        if self.stream is None:
            self._ahead = ((epoch, step), self.source.get(epoch, step))
            return
        with torch.cuda.stream(self.stream):  # reads only what no step writes: no wait needed
            self._ahead = ((epoch, step), self.source.get(epoch, step))

    def get(self, epoch: int, step: int) -> list[Batch]:
        """The batches of (epoch, step): the prefetched ones if they are these, else made now."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[0] != (epoch, step):
            return self.source.get(epoch, step)
        if self.stream is not None:
            main = torch.cuda.current_stream(self.stream.device)
            main.wait_stream(self.stream)
            for batch in ahead[1]:  # made on the side stream, used (and freed) on the main one
                for tensor in batch.values():
                    tensor.record_stream(main)
        return ahead[1]
