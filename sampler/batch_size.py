"""The largest batch that fits: `--auto-batch MAX` finds it by trial on CUDA before sampling.

    probe = probe_batch_size(fits, start=16, cap=1024)   # fits(b) -> bool, assumed monotone
    probe.batch                                          # the largest b <= cap that fitted

The search is pure: it doubles from `start` while `fits` holds (up to `cap`), then bisects between
the last batch that fitted and the first that did not, until they are within 1/16 of each other.
On CUDA, `CudaFits` is one trial: a guided model call of 2b rows through the eager DiT, then a
decode of b latents (in the decoder's chunks), under the run's autocast; it fails on running out
of memory (`torch.cuda.OutOfMemoryError`, or cuBLAS without room for its workspace) or when
the peak memory passes (1 - headroom) of what was free plus what the process holds, which leaves
room for the allocator's fragmentation, the pinned copies and a compiled graph's buffers. On
other devices the given batch size is kept: host memory is not what limits a CPU run.

Results do not depend on the batch (every image's noise comes from its own generator), so the
batch found is not part of sample.json: a resumed run may probe again and find another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from foundation.precision import Precision, autocast
from sampler.errors import SamplerError

log = logging.getLogger(__name__)

HEADROOM = 0.1  # of the memory available to the probe, kept free
REFINE = 16  # bisect until the bounds are within 1/REFINE of the batch


@dataclass
class BatchProbe:
    """What the probe tried: (batch, fitted, peak bytes or None) per trial, in order."""

    batch: int
    trials: list[tuple[int, bool, int | None]] = field(default_factory=list)
    seconds: float = 0.0


def probe_batch_size(fits: Callable[[int], bool], *, start: int, cap: int) -> BatchProbe:
    """The largest batch b <= cap with fits(b): double from `start`, then bisect back.

    Raises SamplerError when not even one image fits.
    """
    t0 = time.perf_counter()
    probe = BatchProbe(batch=0)

    def trial(b: int) -> bool:
        ok = fits(b)
        peak = getattr(fits, "last_peak", None)
        probe.trials.append((b, ok, peak))
        return ok

    good, bad, b = 0, cap + 1, max(1, min(start, cap))
    while b < bad and trial(b):  # double while it fits
        good = b
        b = bad if b == cap else min(2 * b, cap)
    bad = min(bad, b)
    while bad - good > max(1, good // REFINE):  # bisect between the last fit and the first miss
        mid = (good + bad) // 2
        good, bad = (mid, bad) if trial(mid) else (good, mid)
    if good == 0:
        raise SamplerError(
            "--auto-batch: not even a batch of 1 fits in device memory; free the GPU or use a "
            "smaller model"
        )
    probe.batch, probe.seconds = good, time.perf_counter() - t0
    return probe


class CudaFits:
    """One trial on CUDA: a guided model call of 2b rows, then a decode of b latents.

    `model` is the eager DiT (compiling every trial size would take minutes); `decoder` maps
    normalized latents to images on the device. `last_peak` holds the last trial's peak bytes.
    """

    def __init__(
        self,
        model: Callable,
        decoder: Callable,
        *,
        latent_shape: tuple[int, ...],
        device: torch.device,
        precision: Precision,
        headroom: float = HEADROOM,
    ) -> None:
        self.model, self.decoder, self.latent_shape = model, decoder, latent_shape
        self.device, self.precision = device, precision
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        self.budget = (free + torch.cuda.memory_allocated(device)) * (1 - headroom)
        self.last_peak: int | None = None

    def __call__(self, b: int) -> bool:
        torch.cuda.reset_peak_memory_stats(self.device)
        self.last_peak = None
        fitted = self._trial(b)  # the failed trial's tensors are released once it has returned
        torch.cuda.empty_cache()
        if not fitted:
            return False
        self.last_peak = torch.cuda.max_memory_allocated(self.device)
        return self.last_peak <= self.budget

    @torch.no_grad()
    def _trial(self, b: int) -> bool:
        try:
            x = torch.randn(2 * b, *self.latent_shape, device=self.device)
            t = torch.full((2 * b,), 0.5, device=self.device)
            y = torch.zeros(2 * b, dtype=torch.long, device=self.device)
            with autocast(self.device, self.precision):
                self.model(x, t, y)  # outputs unused: freed at once
                self.decoder(x[:b])
            torch.cuda.synchronize(self.device)
        except RuntimeError as e:  # OutOfMemoryError, or cuBLAS failing to get its workspace
            if not isinstance(e, torch.cuda.OutOfMemoryError) and not _out_of_memory(str(e)):
                raise
            return False
        return True


def _out_of_memory(message: str) -> bool:
    return "out of memory" in message or "ALLOC_FAILED" in message


def pick_batch_size(
    batch_size: int,
    auto_batch: int | None,
    device: torch.device,
    make_fits: Callable[[], Callable[[int], bool]],
) -> tuple[int, BatchProbe | None]:
    """(the batch size to use, the probe or None): `batch_size` unless auto_batch is set on CUDA."""
    if auto_batch is None:
        return batch_size, None
    if device.type != "cuda":
        log.info(
            "--auto-batch probes CUDA memory only; keeping --batch-size %d on %s",
            batch_size,
            device,
        )
        return batch_size, None
    probe = probe_batch_size(make_fits(), start=batch_size, cap=auto_batch)
    log.info(
        "--auto-batch: batch %d fits (up to %d; %d trials in %.1f s: %s)",
        probe.batch, auto_batch, len(probe.trials), probe.seconds,
        ", ".join(f"{b}{'' if ok else ' no'}" for b, ok, _ in probe.trials),
    )  # fmt: skip
    return probe.batch, probe
