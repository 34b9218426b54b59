"""Batches of normalized latents for training, from RAM, from the GPU, or streamed by shard.

Every mode answers `batches.get(epoch, step_in_epoch)` with this rank's micro-batches for that
optimizer step: a list of `grad_accum` pairs (x float (b, C, H, W) normalized, y long (b,)) on
the device, b = batch_size / (world_size * grad_accum). All ranks take `steps_per_epoch` steps.

- memory: the whole uint8 array in host RAM (`load_latents`); each step gathers its samples,
  moves the uint8 codes to the device and dequantizes there.
- gpu:    the uint8 array resident on the device; gathering happens there too.
- stream: whole shards (`iter_shards`, a seeded shard order dealt to ranks) into a shuffle
  buffer of `shuffle_shards` shards; for stores larger than RAM.

memory and gpu share one seeded permutation per epoch across ranks: the global batch of step k
is `perm[k*B:(k+1)*B]`, laid out as [micro 0: rank 0, rank 1, ...; micro 1: ...], so a run's
global batches do not depend on the number of ranks. One stored variant (image or hflip) is
drawn per sample. Positions are pure functions of (seed, epoch, step), hence resumable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from latent_store import LatentArrays, LatentditError, LatentStore, dequantize, load_latents
from latent_store.reader import iter_shards, shard_order
from latent_store.verify import verify_store
from trainer.memory_budget import check_fits
from trainer.normalization import LatentNormalization

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
VARIANT_STREAM = 1  # second RNG stream of an epoch: which variant each sample uses


class DataError(LatentditError):
    """The store cannot feed the requested batches."""


@dataclass(frozen=True, kw_only=True)
class BatchLayout:
    """How one optimizer step's global batch is split across ranks and micro-batches."""

    batch_size: int
    grad_accum: int
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.batch_size % (self.world_size * self.grad_accum):
            raise DataError(
                f"--batch-size {self.batch_size} is not divisible by world size "
                f"{self.world_size} x --grad-accum {self.grad_accum}; choose a multiple of "
                f"{self.world_size * self.grad_accum}"
            )

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.world_size * self.grad_accum)

    @property
    def rows_per_micro(self) -> int:
        """Samples in one micro-step over all ranks: the span the noise of a micro-step covers."""
        return self.micro_batch * self.world_size

    def rank_offset(self) -> int:
        """This rank's first row within a micro-step's rows."""
        return self.rank * self.micro_batch

    def positions(self, micro: int) -> np.ndarray:
        """This rank's positions within the global batch for micro-step `micro`."""
        start = micro * self.rows_per_micro + self.rank_offset()
        return np.arange(start, start + self.micro_batch)


class _Batches:
    """Shared by the modes: turning uint8 codes into normalized float latents on the device."""

    def __init__(self, store: LatentStore, norm: LatentNormalization, device: torch.device):
        self.quant, self.norm, self.device = store.spec.quant, norm, device
        self.variants = len(store.spec.variants)

    def _to_model(self, codes: torch.Tensor, labels: torch.Tensor) -> Batch:
        if self.device.type == "cuda" and not codes.is_cuda:
            codes, labels = codes.pin_memory(), labels.pin_memory()  # asynchronous copies
        codes = codes.to(self.device, non_blocking=True)
        x = self.norm.normalize(dequantize(codes, self.quant))
        return x, labels.to(self.device, non_blocking=True)


class ArrayBatches(_Batches):
    """memory and gpu modes: random access to the whole array."""

    def __init__(
        self,
        store: LatentStore,
        norm: LatentNormalization,
        layout: BatchLayout,
        *,
        seed: int,
        device: torch.device,
        on_device: bool,
        verify: bool = True,
    ) -> None:
        super().__init__(store, norm, device)
        arrays = load_latents(store, verify=verify)
        self.layout, self.seed, self.n = layout, seed, len(arrays)
        if self.n < layout.batch_size:
            raise DataError(
                f"{store.path}: {self.n} samples, fewer than one global batch of "
                f"{layout.batch_size}; lower --batch-size"
            )
        self.steps_per_epoch = self.n // layout.batch_size
        home = device if on_device else torch.device("cpu")
        self.latents = torch.from_numpy(arrays.latents).to(home)
        self.labels = torch.from_numpy(arrays.labels).to(home)
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None
        log.info("%d samples held on %s (%.1f MB)", self.n, home, arrays.latents.nbytes / 1e6)

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            variant = np.random.default_rng([self.seed, epoch, VARIANT_STREAM])
            self._epoch = (epoch, perm, variant.integers(self.variants, size=self.n))
        return self._epoch[1], self._epoch[2]

    def get(self, epoch: int, step: int) -> list[Batch]:
        perm, variant = self._epoch_order(epoch)
        out = []
        for micro in range(self.layout.grad_accum):
            pos = step * self.layout.batch_size + self.layout.positions(micro)
            idx, var = (_index(a[pos], self.latents.device) for a in (perm, variant))
            out.append(self._to_model(self.latents[idx, var], self.labels[idx]))
        return out


def _index(positions: np.ndarray, device: torch.device) -> torch.Tensor:
    """Indices on the device the array lives on; to a GPU through pinned memory, without waiting."""
    t = torch.from_numpy(positions)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class StreamBatches(_Batches):
    """stream mode: this rank's shards, whole, through a seeded shuffle buffer."""

    def __init__(
        self,
        store: LatentStore,
        norm: LatentNormalization,
        layout: BatchLayout,
        *,
        seed: int,
        device: torch.device,
        shuffle_shards: int,
        verify: bool = True,
    ) -> None:
        super().__init__(store, norm, device)
        self.store, self.layout, self.seed, self.buffer = store, layout, seed, shuffle_shards
        self.verify = verify
        records = store.records()
        if verify:  # the seal now; each shard as it arrives (`iter_shards`)
            verify_store(store, records=records)
        complete = store.require_complete(records=records)
        sizes = sorted(records[s].written for s in complete)
        per_rank = len(complete) // layout.world_size
        if per_rank == 0:
            raise DataError(
                f"{store.path}: stream mode deals whole shards to ranks, but {len(complete)} "
                f"shards are fewer than {layout.world_size} ranks; use --data memory"
            )
        # Every rank holds at least `per_rank` shards; the smallest ones bound its samples.
        worst = sum(sizes[:per_rank])
        self.steps_per_epoch = worst // (layout.micro_batch * layout.grad_accum)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{store.path}: too few samples per rank for one step; lower --batch-size"
            )
        self._num_shards = len(complete)
        self._iter: Iterator[tuple[np.ndarray, np.ndarray]] | None = None
        self._next: tuple[int, int] | None = None

    def _micro_batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This rank's (codes, labels) micro-batches of an epoch, in host RAM."""
        rng = np.random.default_rng([self.seed, epoch, self.layout.rank])
        mine = len(self._ranks_shards(epoch))
        shards = iter_shards(
            self.store,
            seed=self.seed,
            epoch=epoch,
            rank=self.layout.rank,
            world_size=self.layout.world_size,
            verify=self.verify,
        )
        held: list[LatentArrays] = []
        rest_codes = np.zeros((0, *self.store.spec.latent_shape), np.uint8)
        rest_labels = np.zeros(0, np.int64)
        for i, shard in enumerate(shards):
            held.append(shard)
            if len(held) < self.buffer and i + 1 < mine:
                continue
            lat = np.concatenate([h.latents for h in held])
            variant = rng.integers(self.variants, size=len(lat))
            codes = np.concatenate([rest_codes, lat[np.arange(len(lat)), variant]])
            labels = np.concatenate([rest_labels, *[h.labels for h in held]])
            order = rng.permutation(len(labels))
            codes, labels, held = codes[order], labels[order], []
            b = self.layout.micro_batch
            full = len(labels) // b * b
            for a in range(0, full, b):
                yield codes[a : a + b], labels[a : a + b]
            rest_codes, rest_labels = codes[full:], labels[full:]

    def _ranks_shards(self, epoch: int) -> list[int]:
        return shard_order(
            self._num_shards,
            seed=self.seed,
            epoch=epoch,
            rank=self.layout.rank,
            world_size=self.layout.world_size,
        )

    def get(self, epoch: int, step: int) -> list[Batch]:
        if self._next != (epoch, step):  # a jump (start, resume): replay the epoch up to `step`
            self._iter = self._micro_batches(epoch)
            for _ in range(step * self.layout.grad_accum):
                next(self._iter)
        raw = [next(self._iter) for _ in range(self.layout.grad_accum)]
        out = [self._to_model(torch.from_numpy(c), torch.from_numpy(y)) for c, y in raw]
        self._next = (epoch, step + 1)
        return out


def build_batches(
    store: LatentStore,
    norm: LatentNormalization,
    layout: BatchLayout,
    *,
    mode: str,
    seed: int,
    device: torch.device,
    shuffle_shards: int = 4,
    verify: bool = True,
) -> ArrayBatches | StreamBatches:
    """The batch source of a data mode: "memory", "gpu" or "stream"; `verify`: see the readers."""
    if mode == "stream":
        return StreamBatches(
            store,
            norm,
            layout,
            seed=seed,
            device=device,
            shuffle_shards=shuffle_shards,
            verify=verify,
        )
    if mode == "gpu" and device.type != "cuda":
        raise DataError(f"--data gpu needs a CUDA device, got {device}; use --data memory")
    check_fits(store, mode=mode, device=device)  # refuses before loading what would not fit
    on_device = mode == "gpu"
    return ArrayBatches(
        store, norm, layout, seed=seed, device=device, on_device=on_device, verify=verify
    )
