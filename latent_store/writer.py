"""Write whole shards of the arrays made with a store, and mark them complete.

    writer = StoreWriter(store, shards)
    writer.write_shard(shard, {"latents": codes}, labels, failures=..., clipped={"latents": n})

Each writer (rank) owns whole shards and writes nothing else: zarr-python 3 loses data silently
when two writers share a shard. A shard's record is written only after its data (every declared
array, the labels, the statistics rows) is on disk, so a crash at any moment leaves the shard
incomplete, never wrong; re-running rewrites it. `finalize_store` (one process, after every
writer) then writes the summary. Arrays added to a store later have their own writer
(`latent_store.added`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from latent_store.arrays import LABELS, STATS_SUFFIX, ArraySpec
from latent_store.checksums import parts_checksum, shard_checksum
from latent_store.errors import SchemaMismatchError
from latent_store.finalize import finalize_store, summarize_records
from latent_store.quantize import QMAX
from latent_store.records import ArrayPart
from latent_store.schema import LABEL_FILL, Failure, ShardRecord
from latent_store.stats import STATS_SAMPLES_PER_SHARD, shard_stats
from latent_store.store import LatentStore
from latent_store.verify import check_shard, verify_store

__all__ = ["StoreWriter", "finalize_store", "summarize_records"]

log = logging.getLogger(__name__)


class ShardFiles:
    """What the writers of whole shards share: owning shards, discarding a crash's leftovers,
    making a shard's files durable before its record."""

    store: LatentStore

    def _discard(self, shard: int, names: Sequence[str]) -> None:
        """Delete whatever a crashed run left of an unfinished shard of `names`."""
        for key in self.store.shard_files(shard, names):
            if self.store.has_key(key):
                log.info("removing leftover %s of unfinished shard %d", key, shard)
                self.store.delete_key(key)

    def _sync(self, shard: int, names: Sequence[str]) -> None:
        """fsync a local shard's files so the record never gets ahead of the data.

        An object store needs nothing here: a PUT that returned is durable.
        """
        root = self.store.local_root
        if root is None:
            return
        for key in self.store.shard_files(shard, names):
            fd = os.open(root / key, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def start_part(
    array: ArraySpec,
    values: np.ndarray,
    written: np.ndarray,
    pool: ThreadPoolExecutor,
    with_stats: bool,
) -> tuple[Future, Future | None]:
    """Start hashing `values` and gathering their statistics (both release the GIL, so they
    overlap the zarr write); `part_of` turns the results into the record's part."""
    checksum = pool.submit(shard_checksum, {array.name: values})
    stats = pool.submit(shard_stats, values, array, written) if with_stats else None
    return checksum, stats


def part_of(
    array: ArraySpec, values: np.ndarray, written: np.ndarray, clipped: int | None, checksum, row
) -> ArrayPart:
    """The record's part of one array: its checksum, clipping and statistics row checksum.

    clipped: as the quantizer counted; None: the codes at 0 or 255 (which bound it from above).
    """
    quantized = int(written.sum()) * math.prod(values.shape[1:]) if array.quant is not None else 0
    if clipped is None and array.quant is not None:
        clipped = _saturated(values) - _saturated(values[~written])
    stats, count = row if row is not None else (None, 0)
    return ArrayPart(
        checksum=checksum,
        clipped=int(clipped or 0),
        quantized=int(quantized),
        stats="" if stats is None else shard_checksum({array.name: stats}),
        stats_count=count,
    )


def _saturated(codes: np.ndarray) -> int:
    """Codes at 0 or QMAX (uint8 arithmetic wraps 0 - 1 to 255): one pass, no copy of the rows."""
    return int(np.count_nonzero((codes - np.uint8(1)) >= QMAX - 1))


class StoreWriter(ShardFiles):
    """Writes the shards a process owns into an existing store.

    On creation it refuses a store whose sealed metadata was edited, and discards the leftovers
    of a crash (data of owned shards without a record) and owned shards that fail verification,
    so a resumed run starts each unfinished or damaged shard from nothing.
    """

    def __init__(self, store: LatentStore, shards: Iterable[int] | None = None) -> None:
        self.store = store.reopen("r+")
        self.spec = self.store.spec
        verify_store(self.store, summary=False)
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="shard-stats")
        owned = range(self.spec.num_shards) if shards is None else shards
        records = self.store.records()
        self.done = {i for i in owned if records[i] is not None and self._sound(i, records[i])}
        self.todo = [i for i in owned if i not in self.done]
        for shard in self.todo:
            self._discard(shard, [*self.spec.base_names, LABELS])

    def _sound(self, shard: int, record: ShardRecord) -> bool:
        """Whether a complete shard passes verification; a damaged one loses its record."""
        _, problems, labels = check_shard(self.store, shard, record)
        if problems or labels:
            log.warning("re-encoding damaged shard %d: %s", shard, "; ".join(problems + labels))
            self.store.array("shard_records")[shard] = ""
        return not (problems or labels)

    def write_shard(
        self,
        shard: int,
        arrays: Mapping[str, np.ndarray],
        labels: np.ndarray,
        *,
        failures: Sequence[Failure] = (),
        image_modes: Mapping[str, int] | None = None,
        clipped: Mapping[str, int] | None = None,
    ) -> ShardRecord:
        """Write one whole shard, then its completion record.

        arrays: name -> rows (n, [V,] *shape) of the dtype the spec declares, for the shard's n
            samples and every array made with the store; rows of failed samples are ignored
            (write zeros). labels: int (n,), LABEL_FILL exactly at `failures`.
        clipped: name -> quantized values that were clipped, as counted by `quantize`.
        """
        start, stop = self.spec.shard_bounds(shard)
        labels = np.asarray(labels, dtype=np.int16)
        self._check(shard, start, stop, arrays, labels, failures)
        data = {n: np.ascontiguousarray(arrays[n]) for n in self.spec.base_names}
        written = labels != LABEL_FILL
        v2 = self.spec.format_version >= 2
        # checksums and statistics (xxhash and numpy release the GIL) overlap the zarr write
        pending = {
            a.name: start_part(a, data[a.name], written, self._pool, v2)
            for a in self.spec.base_arrays
        }
        label_sum = self._pool.submit(shard_checksum, {LABELS: labels})
        v1_sums = None if v2 else self._pool.submit(self._channel_sums, data, labels)
        for name, values in (*data.items(), (LABELS, labels)):
            self.store.array(name)[start:stop] = values
        parts = {}
        for array in self.spec.base_arrays:
            checksum, stats = (f.result() if f else None for f in pending[array.name])
            if stats is not None:
                self.store.array(array.name + STATS_SUFFIX)[shard] = stats[0]
            count = (clipped or {}).get(array.name)
            parts[array.name] = part_of(array, data[array.name], written, count, checksum, stats)
        parts[LABELS] = ArrayPart(checksum=label_sum.result())
        self._sync(shard, [*self.spec.base_names, LABELS])
        common = dict(
            shard=shard,
            start=start,
            stop=stop,
            failures=tuple(failures),
            image_modes=dict(sorted((image_modes or {}).items())),
        )
        if v2:
            root = parts_checksum([p.checksum for p in parts.values()])
            record = ShardRecord(**common, checksum=root, arrays=parts)
        else:  # a v1 store keeps v1 records: one checksum over all its arrays, the latents' sums
            latents = parts["latents"]
            record = ShardRecord(
                **common,
                checksum=shard_checksum({**data, LABELS: labels}),
                clipped=latents.clipped,
                quantized=latents.quantized,
                **v1_sums.result(),
            )
        self.store.array("shard_records")[shard] = record.to_json()
        self.done.add(shard)
        return record

    def _check(self, shard, start, stop, arrays, labels, failures) -> None:
        n = stop - start
        if not isinstance(arrays, Mapping):
            raise TypeError(
                f"arrays: a mapping name -> rows, e.g. {{'latents': codes}}, not {type(arrays).__name__}"
            )
        if sorted(arrays) != sorted(self.spec.base_names):
            raise SchemaMismatchError(
                f"shard {shard}: arrays {sorted(arrays)} given, the store is written with "
                f"{list(self.spec.base_names)}"
            )
        for array in self.spec.base_arrays:
            values, expect = arrays[array.name], (n, *self.spec.row_shape(array.name))
            if values.shape != expect or values.dtype != np.dtype(array.dtype):
                raise SchemaMismatchError(
                    f"shard {shard}: {array.name} {values.dtype}{values.shape}, store wants "
                    f"{array.dtype}{expect}"
                )
        failed = {f.index - start for f in failures}
        unlabeled = set(np.flatnonzero(labels == LABEL_FILL).tolist())
        assert labels.shape == (n,), f"labels shape {labels.shape} != ({n},)"
        assert failed == unlabeled, "labels must be LABEL_FILL exactly at the failed samples"
        bad = labels[(labels != LABEL_FILL) & ((labels < 0) | (labels >= self.spec.num_classes))]
        if bad.size:
            raise SchemaMismatchError(
                f"shard {shard}: label {int(bad[0])} outside 0..{self.spec.num_classes - 1}"
            )

    def _channel_sums(self, data: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
        """A v1 record's per-channel sums of dequantized latents, from code histograms of a
        subsample (every k-th written sample, about STATS_SAMPLES_PER_SHARD of them)."""
        written = data["latents"][labels != LABEL_FILL]
        codes = written[:: max(1, len(written) // STATS_SAMPLES_PER_SHARD)]
        q = self.spec.quant
        sums, sumsqs = [], []
        for c in range(self.spec.latent_shape[0]):
            hist = np.bincount(codes[:, :, c].ravel(), minlength=QMAX + 1)
            values = q.offset[c] + q.scale[c] * np.arange(QMAX + 1, dtype=np.float64)
            sums.append(float(hist @ values))
            sumsqs.append(float(hist @ values**2))
        return {
            "channel_sum": tuple(sums),
            "channel_sumsq": tuple(sumsqs),
            "channel_count": int(codes[:, :, 0].size),
        }
