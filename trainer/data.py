"""Batches of normalized latents for training, from RAM, from the GPU, or streamed by shard.

Every mode answers `batches.get(epoch, step_in_epoch)` with this rank's micro-batches for that
optimizer step: a list of `grad_accum` named batches on the device, b = batch_size /
(world_size * grad_accum) samples each:

    {"latents": float (b, C, H, W) normalized, "labels": long (b,),
     name: float (b, *shape) decoded, for each other declared array a consumer asks for}

All ranks take `steps_per_epoch` steps. Only the arrays asked for are read from the store.

- memory: the whole uint8 array in host RAM (`load_latents`); each step gathers its samples,
  moves the uint8 codes to the device and dequantizes there.
- gpu:    the uint8 array resident on the device; gathering happens there too.
- stream: whole shards (`iter_shards`, a seeded shard order dealt to ranks) into a shuffle
  buffer of `shuffle_shards` shards; for stores larger than RAM.

memory and gpu share one seeded permutation per epoch across ranks: the global batch of step k
is `perm[k*B:(k+1)*B]`, laid out as [micro 0: rank 0, rank 1, ...; micro 1: ...], so a run's
global batches do not depend on the number of ranks. One stored variant (image or hflip) is
drawn per sample, the same for every array of the sample that has variants. Positions are pure
functions of (seed, epoch, step), hence resumable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from latent_store import LatentArrays, LatentditError, LatentStore, load_latents
from latent_store.arrays import LABELS, LATENTS
from latent_store.quantize import decode
from latent_store.reader import iter_shards, shard_order
from latent_store.shard_file import Buffers
from latent_store.verify import verify_store
from trainer.memory_budget import check_fits
from trainer.normalization import LatentNormalization

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
"""A named batch: "latents" (normalized), "labels", and the other arrays asked for (decoded)."""
Rows = dict[str, np.ndarray]  # stored rows of a micro-batch by array name, and its "labels"
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
    """Shared by the modes: turning stored rows into a named batch of values on the device."""

    def __init__(
        self,
        store: LatentStore,
        norm: LatentNormalization,
        device: torch.device,
        arrays: Sequence[str] = (),
    ):
        self.norm, self.device = norm, device
        self.variants = len(store.spec.variants)
        names = [LATENTS, *(n for n in arrays if n != LATENTS)]
        self.arrays = {n: store.spec.array(n) for n in names}  # unknown names: one line, here

    def _to_model(self, rows: Mapping[str, torch.Tensor]) -> Batch:
        """Stored rows (the arrays and "labels") to values on the device: decoded there, the
        latents normalized."""
        batch = {}
        for name, values in rows.items():
            if self.device.type == "cuda" and not values.is_cuda:
                values = values.pin_memory()  # an asynchronous copy
            batch[name] = values.to(self.device, non_blocking=True)
        for name, array in self.arrays.items():
            batch[name] = decode(batch[name], array)
        batch[LATENTS] = self.norm.normalize(batch[LATENTS])
        return batch

    def _pick(self, name: str, rows, index, variant):
        """Rows of samples `index`, at their drawn variant where the array has variants."""
        return rows[index, variant] if self.arrays[name].variants else rows[index]


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
        arrays: Sequence[str] = (),
    ) -> None:
        super().__init__(store, norm, device, arrays)
        loaded = load_latents(store, names=list(self.arrays), verify=verify)
        self.layout, self.seed, self.n = layout, seed, len(loaded)
        if self.n < layout.batch_size:
            raise DataError(
                f"{store.path}: {self.n} samples, fewer than one global batch of "
                f"{layout.batch_size}; lower --batch-size"
            )
        self.steps_per_epoch = self.n // layout.batch_size
        home = device if on_device else torch.device("cpu")
        self.rows = {n: torch.from_numpy(v).to(home) for n, v in loaded.arrays.items()}
        self.labels = torch.from_numpy(loaded.labels).to(home)
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None
        size = sum(v.nbytes for v in loaded.arrays.values())
        log.info("%d samples held on %s (%.1f MB)", self.n, home, size / 1e6)

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
            idx, var = (_index(a[pos], self.labels.device) for a in (perm, variant))
            rows = {n: self._pick(n, v, idx, var) for n, v in self.rows.items()}
            out.append(self._to_model({**rows, LABELS: self.labels[idx]}))
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
        arrays: Sequence[str] = (),
    ) -> None:
        super().__init__(store, norm, device, arrays)
        self.store, self.layout, self.seed, self.buffer = store, layout, seed, shuffle_shards
        self.verify = verify
        records = store.records()
        if verify:  # the seal now; each shard as it arrives (`iter_shards`)
            verify_store(store, records=records)
        complete = store.require_complete(records=records, names=list(self.arrays))
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
        self._buffers = Buffers()  # shards' memory, reused from epoch to epoch
        self._iter: Iterator[Rows] | None = None
        self._next: tuple[int, int] | None = None

    def _micro_batches(self, epoch: int) -> Iterator[Rows]:
        """This rank's micro-batches of an epoch (stored rows and labels), in host RAM."""
        rng = np.random.default_rng([self.seed, epoch, self.layout.rank])
        mine = len(self._ranks_shards(epoch))
        shards = iter_shards(
            self.store,
            names=list(self.arrays),
            seed=self.seed,
            epoch=epoch,
            rank=self.layout.rank,
            world_size=self.layout.world_size,
            verify=self.verify,
            buffers=self._buffers,
        )
        held: list[LatentArrays] = []
        rest = {n: np.zeros((0, *a.shape), a.dtype) for n, a in self.arrays.items()}
        rest[LABELS] = np.zeros(0, np.int64)
        for i, shard in enumerate(shards):
            held.append(shard)
            if len(held) < self.buffer and i + 1 < mine:
                continue
            count = sum(len(h) for h in held)
            variant, every = rng.integers(self.variants, size=count), np.arange(count)
            rows = {}
            for name in self.arrays:
                picked = self._pick(name, np.concatenate([h[name] for h in held]), every, variant)
                rows[name] = np.concatenate([rest[name], picked])
            rows[LABELS] = np.concatenate([rest[LABELS], *[h.labels for h in held]])
            order = rng.permutation(len(rows[LABELS]))
            rows, held = {n: v[order] for n, v in rows.items()}, []
            b = self.layout.micro_batch
            full = len(rows[LABELS]) // b * b
            for a in range(0, full, b):
                yield {n: v[a : a + b] for n, v in rows.items()}
            rest = {n: v[full:] for n, v in rows.items()}

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
        out = [self._to_model({n: torch.from_numpy(v) for n, v in rows.items()}) for rows in raw]
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
    arrays: Sequence[str] = (),
) -> ArrayBatches | StreamBatches:
    """The batch source of a data mode: "memory", "gpu" or "stream"; `verify`: see the readers.

    arrays: declared arrays besides the latents that the batches carry (e.g. "features").
    """
    common = dict(seed=seed, device=device, verify=verify, arrays=arrays)
    if mode == "stream":
        return StreamBatches(store, norm, layout, shuffle_shards=shuffle_shards, **common)
    if mode == "gpu" and device.type != "cuda":
        raise DataError(f"--data gpu needs a CUDA device, got {device}; use --data memory")
    check_fits(store, mode=mode, device=device, names=(LATENTS, *arrays))  # before any load
    return ArrayBatches(store, norm, layout, on_device=mode == "gpu", **common)
