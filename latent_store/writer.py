"""Write whole shards, mark them complete, and summarize a finished store.

Each writer (rank) owns whole shards and writes nothing else: zarr-python 3 loses data silently
when two writers share a shard. A shard's record is written only after its data is on disk, so a
crash at any moment leaves the shard incomplete, never wrong; re-running rewrites it.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from latent_store.errors import SchemaMismatchError
from latent_store.quantize import QMAX
from latent_store.schema import ATTRS_KEY, LABEL_FILL, Failure, ShardRecord
from latent_store.store import SUMMARY_KEY, LatentStore, shard_checksum
from latent_store.verify import check_shard, verify_store

log = logging.getLogger(__name__)

STATS_SAMPLES_PER_SHARD = 1024


class StoreWriter:
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
            self._discard(shard)

    def _sound(self, shard: int, record: ShardRecord) -> bool:
        """Whether a complete shard passes verification; a damaged one loses its record."""
        _, problems, labels = check_shard(self.store, shard, record)
        if problems or labels:
            log.warning("re-encoding damaged shard %d: %s", shard, "; ".join(problems + labels))
            self.store.array("shard_records")[shard] = ""
        return not (problems or labels)

    def _discard(self, shard: int) -> None:
        """Delete whatever a crashed run left of an unfinished shard."""
        for key in self.store.shard_files(shard):
            if self.store.has_key(key):
                log.info("removing leftover %s of unfinished shard %d", key, shard)
                self.store.delete_key(key)

    def write_shard(
        self,
        shard: int,
        latents: np.ndarray,
        labels: np.ndarray,
        *,
        logstd: np.ndarray | None = None,
        failures: Sequence[Failure] = (),
        image_modes: Mapping[str, int] | None = None,
        clipped: int = 0,
    ) -> ShardRecord:
        """Write one whole shard, then its completion record.

        latents: uint8 (n, V, C, H, W) for the shard's n samples; rows of failed samples are
            ignored (write zeros). labels: int (n,), LABEL_FILL exactly at `failures`.
        logstd: uint8 like latents, required iff the store keeps posterior moments.
        clipped: quantized values that were clipped, as counted by `quantize`.
        """
        start, stop = self.spec.shard_bounds(shard)
        labels = np.asarray(labels, dtype=np.int16)
        self._check(shard, start, stop, latents, labels, logstd, failures)
        data = {"latents": np.ascontiguousarray(latents), "labels": labels}
        if logstd is not None:
            data["logstd"] = np.ascontiguousarray(logstd)
        # checksum and statistics (xxhash and numpy release the GIL) overlap the zarr write
        checksum = self._pool.submit(shard_checksum, data)
        sums = self._pool.submit(self._channel_sums, latents, labels)
        for name, values in data.items():
            self.store.array(name)[start:stop] = values
        self._sync(shard)
        record = ShardRecord(
            shard=shard,
            start=start,
            stop=stop,
            checksum=checksum.result(),
            failures=tuple(failures),
            image_modes=dict(sorted((image_modes or {}).items())),
            clipped=int(clipped),
            quantized=int(latents.size - len(failures) * latents[0].size),
            **sums.result(),
        )
        self.store.array("shard_records")[shard] = record.to_json()
        self.done.add(shard)
        return record

    def _check(self, shard, start, stop, latents, labels, logstd, failures) -> None:
        n = stop - start
        expect = (n, *self.spec.sample_shape)
        if latents.shape != expect or latents.dtype != np.uint8:
            raise SchemaMismatchError(
                f"shard {shard}: latents {latents.dtype}{latents.shape}, store wants uint8{expect}"
            )
        if (logstd is None) != (self.spec.posterior != "moments"):
            raise SchemaMismatchError(f"shard {shard}: logstd given iff posterior is 'moments'")
        if logstd is not None and logstd.shape != expect:
            raise SchemaMismatchError(f"shard {shard}: logstd shape {logstd.shape} != {expect}")
        failed = {f.index - start for f in failures}
        unlabeled = set(np.flatnonzero(labels == LABEL_FILL).tolist())
        assert labels.shape == (n,), f"labels shape {labels.shape} != ({n},)"
        assert failed == unlabeled, "labels must be LABEL_FILL exactly at the failed samples"
        bad = labels[(labels != LABEL_FILL) & ((labels < 0) | (labels >= self.spec.num_classes))]
        if bad.size:
            raise SchemaMismatchError(
                f"shard {shard}: label {int(bad[0])} outside 0..{self.spec.num_classes - 1}"
            )

    def _channel_sums(self, latents: np.ndarray, labels: np.ndarray) -> dict:
        """Per-channel sums of dequantized latents, from code histograms of a subsample.

        Every k-th written sample counts (about STATS_SAMPLES_PER_SHARD of them), which keeps the
        statistics cheap next to the shard write while still covering every shard.
        """
        written = latents[labels != LABEL_FILL]
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

    def _sync(self, shard: int) -> None:
        """fsync a local shard's files so the record never gets ahead of the data.

        An object store needs nothing here: a PUT that returned is durable.
        """
        root = self.store.local_root
        if root is None:
            return
        for key in self.store.shard_files(shard):
            fd = os.open(root / key, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def summarize_records(
    store: LatentStore, records: Sequence[ShardRecord | None] | None = None
) -> dict:
    """Aggregate the shard records (default: read now) into the store's summary (counts,
    failures, statistics)."""
    records = store.records() if records is None else records
    done = [r for r in records if r is not None]
    modes: Counter[str] = Counter()
    for r in done:
        modes.update(r.image_modes)
    failures = [f for r in done for f in r.failures]
    quantized = sum(r.quantized for r in done)
    count = sum(r.channel_count for r in done)
    channels = store.spec.latent_shape[0]
    mean = std = [float("nan")] * channels
    if count:
        s = np.sum([r.channel_sum for r in done], axis=0)
        ss = np.sum([r.channel_sumsq for r in done], axis=0)
        mean_a = s / count
        mean, std = mean_a.tolist(), np.sqrt(np.maximum(ss / count - mean_a**2, 0)).tolist()
    return {
        "complete": len(done) == len(records),
        "shards_complete": len(done),
        "shards_total": len(records),
        "samples_written": sum(r.written for r in done),
        "samples_failed": len(failures),
        "failure_reasons": dict(Counter(f.reason.split(":")[0] for f in failures).most_common()),
        "image_modes": dict(sorted(modes.items())),
        "clipped_fraction": (sum(r.clipped for r in done) / quantized) if quantized else 0.0,
        "channel_mean": mean,
        "channel_std": std,
    }


def finalize_store(store: LatentStore) -> dict:
    """Write the summary into the group attributes. Call from one process after all writers."""
    summary = summarize_records(store)
    rw = store.reopen("r+")
    attrs = rw.group.attrs[ATTRS_KEY]
    rw.group.attrs[ATTRS_KEY] = {**attrs, SUMMARY_KEY: summary}
    return summary
