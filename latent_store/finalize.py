"""The summary of a store: counts, failures and every array's statistics, from the shard records.

    summary = finalize_store(store)     # one process, after every writer (encode's rank 0)

attrs["latentdit"]["summary"] holds the counts, failure reasons and image modes; the latents'
clipped fraction and per-channel mean and std at the top (where v1 stores have them); and, per
array with statistics (`latent_store.stats`), a section under "arrays": clipped fraction, the
per-channel statistics, the checksum of the store's statistics row ("stats", the last row of
`<name>_stats`, per position) and the digest of the shards' statistics checksums it was combined
from ("sources"). Readers check a summary against the records without reading any shard's
statistics (`summary_problems`): the counts and digests follow from the records, the rest from
the store's row. An added array is summarized once all its shards are written; finalize again
after writing one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from latent_store.arrays import LATENTS, STATS_SUFFIX
from latent_store.checksums import parts_checksum, shard_checksum
from latent_store.errors import SchemaMismatchError, StoreCorruptError, StoreIncompleteError
from latent_store.records import ShardRecord
from latent_store.schema import ATTRS_KEY
from latent_store.stats import channel_stats, combine
from latent_store.store import SUMMARY_KEY, LatentStore

ARRAYS_KEY = "arrays"


def summarize_records(
    store: LatentStore,
    records: Sequence[ShardRecord | None] | None = None,
    rows: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """The summary of `records` (default: read now). rows: the store's statistics row of each
    array to summarize (`finalize_store` combines them; `summary_problems` reads them)."""
    records = store.records() if records is None else records
    done = [r for r in records if r is not None]
    modes: Counter[str] = Counter()
    for r in done:
        modes.update(r.image_modes)
    failures = [f for r in done for f in r.failures]
    summary = {
        "complete": len(done) == len(records),
        "shards_complete": len(done),
        "shards_total": len(records),
        "samples_written": sum(r.written for r in done),
        "samples_failed": len(failures),
        "failure_reasons": dict(Counter(f.reason.split(":")[0] for f in failures).most_common()),
        "image_modes": dict(sorted(modes.items())),
    }
    sections = {
        name: _array_section(
            store, name, records if not store.spec.array(name).added else None, row
        )
        for name, row in (rows or {}).items()
    }
    if store.spec.format_version == 1:
        summary.update(_v1_latents(store, done))
    else:
        latents = sections.get(LATENTS) or {}
        summary.update(
            {k: latents.get(k) for k in ("clipped_fraction", "channel_mean", "channel_std")}
        )
    if sections:
        summary[ARRAYS_KEY] = sections
    return summary


def _array_section(
    store: LatentStore, name: str, records: Sequence[ShardRecord | None] | None, row: np.ndarray
) -> dict:
    """One array's summary from its shards' record parts and the store's statistics row."""
    records = store.records(name) if records is None else records
    parts = [r.arrays[name] for r in records if r is not None]
    quantized = sum(p.quantized for p in parts)
    mean, std = channel_stats(row)
    return {
        "clipped_fraction": sum(p.clipped for p in parts) / quantized if quantized else 0.0,
        "count": sum(p.stats_count for p in parts),
        "channel_mean": mean,
        "channel_std": std,
        "stats": shard_checksum({name: row}),
        "sources": parts_checksum([p.stats for p in parts]) if parts else "",
    }


def _v1_latents(store: LatentStore, done: list[ShardRecord]) -> dict:
    """The latents' statistics of a v1 store, from the per-channel sums of its records."""
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
        "clipped_fraction": (sum(r.clipped for r in done) / quantized) if quantized else 0.0,
        "channel_mean": mean,
        "channel_std": std,
    }


def summarized_arrays(store: LatentStore) -> list[str]:
    """The arrays a finalized summary covers: every one with statistics made with the store, and
    each added one once it is written completely."""
    spec = store.spec
    names = [a.name for a in spec.base_arrays if spec.has_stats(a.name)]
    added = [a.name for a in spec.added_arrays]
    return names + [n for n in added if all(r is not None for r in store.records(n))]


def summary_rows(store: LatentStore) -> dict[str, np.ndarray]:
    """The statistics rows of the arrays the store's summary names, as stored (for checking)."""
    named = (store.summary or {}).get(ARRAYS_KEY) or {}
    return {n: store_row(store, n) for n in store.spec.names if n in named}


def shard_stats_rows(store: LatentStore, name: str, records: Sequence[ShardRecord | None]):
    """[(count, row)] of the complete shards' statistics of `name`, each checked against its
    record; StoreCorruptError naming the first one that is not what its record says."""
    arr = store.array(name + STATS_SUFFIX)
    rows = store.fetch(lambda: arr[: len(records)], f"{store.path}/{name}{STATS_SUFFIX}")
    parts = []
    for shard, record in enumerate(records):
        if record is None:
            continue
        part = record.arrays[name]
        if shard_checksum({name: rows[shard]}, part.stats.partition(":")[0]) != part.stats:
            raise StoreCorruptError(
                f"{store.path}: shard {shard}: the statistics of {name!r} do not match their "
                f"checksum; run `latentdit validate {store.path}`, then re-run the command that "
                "wrote the shard"
            )
        parts.append((part.stats_count, rows[shard]))
    return parts


def store_row(store: LatentStore, name: str) -> np.ndarray:
    """The store's statistics row of `name` (the last row of `<name>_stats`), as stored."""
    arr = store.array(name + STATS_SUFFIX)
    return store.fetch(lambda: arr[arr.shape[0] - 1], f"{store.path}/{name}{STATS_SUFFIX}")


def finalize_store(store: LatentStore) -> dict:
    """Combine the statistics and write the summary. Call from one process after all writers."""
    rw = store.reopen("r+")
    rows = {}
    for name in summarized_arrays(rw):
        parts = shard_stats_rows(rw, name, rw.records(name))
        if any(count for count, _ in parts):
            row, _ = combine(parts)
            rw.array(name + STATS_SUFFIX)[rw.spec.num_shards] = row
            rows[name] = row
    summary = summarize_records(rw, rw.records(), rows)
    attrs = rw.group.attrs[ATTRS_KEY]
    rw.group.attrs[ATTRS_KEY] = {**attrs, SUMMARY_KEY: summary}
    return summary


def position_stats(store: LatentStore, name: str) -> np.ndarray:
    """The store's per-position statistics of array `name`, float32 (2, *shape) = [mean, var],
    checked against the summary's checksum; one line naming the fix when there are none."""
    if not store.spec.has_stats(name):
        raise SchemaMismatchError(
            f"{store.path}: a format v1 store keeps per-channel statistics of its {name} only; "
            "re-encode it with this latentdit for per-position ones, or use channel_stats"
        )
    section = ((store.summary or {}).get(ARRAYS_KEY) or {}).get(name)
    if section is None:
        raise StoreIncompleteError(
            f"{store.path}: no summarized statistics of {name!r} yet; finish writing the store "
            "(the encode command, or the one that adds the array, summarizes it at the end)"
        )
    row = store_row(store, name)
    if shard_checksum({name: row}, section["stats"].partition(":")[0]) != section["stats"]:
        raise StoreCorruptError(
            f"{store.path}: the statistics of {name!r} do not match the checksum its summary "
            f"records; run `latentdit validate {store.path}`"
        )
    return row
