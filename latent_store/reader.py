"""Read a store into RAM, or stream it shard by shard.

Training never indexes Zarr sample by sample: `load_latents` reads whole shards into one array
per declared array it is asked for, `iter_shards` yields whole shards in a seeded, rank-aware
order for stores larger than RAM. Readers name the arrays they need (`names`, default the
latents), and only those are read and verified. Decode batches with `latent_store.quantize.decode`
(or `dequantize`) on the consumer's device.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from latent_store.arrays import LABELS, LATENTS
from latent_store.errors import StoreCorruptError
from latent_store.schema import LABEL_FILL, ShardRecord, StoreSpec
from latent_store.shard_file import Buffers
from latent_store.store import LatentStore, open_store
from latent_store.verify import verify_shard, verify_store, verify_summary

LOAD_THREADS = 16  # shards fetched at once by load_latents (object stores: requests in flight)
PREFETCH = 1  # shards iter_shards fetches ahead of the one it yields
DEFAULT_NAMES = (LATENTS,)


@dataclass(frozen=True)
class LatentArrays:
    """Written samples held in RAM.

    arrays: name -> stored rows (M, [V,] *shape) of each array read (`arrays["latents"]`: uint8
    (M, V, C, H, W)); labels: int64 (M,); indices: int64 (M,) positions in the store (to look up
    keys).
    """

    arrays: Mapping[str, np.ndarray]
    labels: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def latents(self) -> np.ndarray:
        return self.arrays[LATENTS]


def _shard_arrays(
    store: LatentStore,
    shard: int,
    record: ShardRecord | None,
    names: Sequence[str],
    added: Mapping[str, list] | None,
    buffers: Buffers | None = None,
) -> LatentArrays:
    """A shard's written samples of `names`; checked against `record` (and the added arrays'
    records, `added`: name -> records) first, unless `record` is None (no verify). buffers: what
    a local shard is read into (`shard_file.Buffers`)."""
    if record is None:
        data = store.read_shard(shard, names, buffers=buffers)
    else:
        mine = {n: rs[shard] for n, rs in (added or {}).items()}
        data = verify_shard(store, shard, record, names=names, added=mine, buffers=buffers)
    keep = data[LABELS] != LABEL_FILL
    rows = slice(None) if keep.all() else keep  # no copy of a shard with every sample written
    start, _ = store.spec.shard_bounds(shard)
    return LatentArrays(
        arrays={n: data[n][rows] for n in names},
        labels=data[LABELS][rows].astype(np.int64),
        indices=np.flatnonzero(keep) + start,
    )


def _allocate(spec: StoreSpec, names: Sequence[str], rows: int) -> LatentArrays:
    """Uninitialized arrays for `rows` samples of `names`, filled shard by shard by the loader."""
    return LatentArrays(
        arrays={n: np.empty((rows, *spec.row_shape(n)), spec.array(n).dtype) for n in names},
        labels=np.empty(rows, np.int64),
        indices=np.empty(rows, np.int64),
    )


def _fill(out: LatentArrays, at: int, part: LatentArrays, rows: int, where: str) -> None:
    """Copy a shard's samples into `out` from row `at`; it must hold the `rows` its record says."""
    if len(part) != rows:  # only without verify: a verified shard matches its record
        raise StoreCorruptError(
            f"{where}: {len(part)} written samples, its record says {rows}; run `latentdit "
            "validate` on the store"
        )
    for name, values in part.arrays.items():
        out.arrays[name][at : at + rows] = values
    out.labels[at : at + rows] = part.labels
    out.indices[at : at + rows] = part.indices


def _added_records(store: LatentStore, names: Sequence[str], verify: bool) -> dict[str, list]:
    """The records of the added arrays among `names` (read once, for every shard's check)."""
    if not verify:
        return {}
    return {n: store.records(n) for n in names if store.spec.array(n).added}


def load_latents(
    path: str | os.PathLike | LatentStore,
    *,
    names: Sequence[str] = DEFAULT_NAMES,
    shards: Sequence[int] | None = None,
    allow_incomplete: bool = False,
    threads: int = LOAD_THREADS,
    verify: bool = True,
) -> LatentArrays:
    """Load the written samples of the arrays `names` of a store (or of some shards) into RAM.

    `threads` whole shards are fetched at once: on an object store each is one GET per array,
    so the load runs at the store's aggregate bandwidth instead of one request's latency.
    Raises StoreIncompleteError naming the missing shards unless every requested shard is
    complete or `allow_incomplete` is set (incomplete shards are then skipped). With `verify`,
    the store's seal and every shard's record are checked (`latent_store.verify`); each shard is
    hashed in the thread that read it, and the seal checked in another, so verifying overlaps
    the reads. The result is allocated once, from the records' counts, and each shard is copied
    into it as it arrives: the peak is the result plus the `threads` shards in flight.
    """
    store = open_store(path)
    names = [store.spec.array(n).name for n in names]  # unknown names: one line, here
    with ThreadPoolExecutor(max(1, threads)) as pool:
        # the store-wide checks (their requests too, at a URL) overlap the records and shards
        sealed = pool.submit(verify_store, store, summary=False) if verify else None
        records = None
        try:
            records = store.records()
            todo = store.require_complete(
                shards, allow_incomplete=allow_incomplete, records=records, names=names
            )
            checked = records if verify else [None] * len(records)
            added = _added_records(store, names, verify)
            rows = [records[s].written for s in todo]
            starts = [0, *itertools.accumulate(rows)]
            out = _allocate(store.spec, names, starts[-1])

            def load(i: int) -> None:  # one shard in flight per thread, copied, then dropped
                part = _shard_arrays(store, todo[i], checked[todo[i]], names, added)
                _fill(out, starts[i], part, rows[i], f"{store.path}: shard {todo[i]}")

            list(pool.map(load, range(len(todo))))
        finally:  # a broken seal or summary explains shard problems: it is reported first
            if sealed is not None:
                sealed.result()
                if records is not None:
                    verify_summary(store, records)
    return out


def shard_order(num_shards: int, *, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """This rank's shards for an epoch: one seeded permutation shared by all ranks, dealt round-robin."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_shards)
    return perm[rank::world_size].tolist()


def iter_shards(
    path: str | os.PathLike | LatentStore,
    *,
    names: Sequence[str] = DEFAULT_NAMES,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    allow_incomplete: bool = False,
    verify: bool = True,
    buffers: Buffers | None = None,
) -> Iterator[LatentArrays]:
    """Yield this rank's complete shards of the arrays `names`, whole, in a seeded order that
    changes every epoch.

    The next shard is fetched (and, with `verify`, checked) while the consumer works on the
    current one; with `verify` the store's seal is checked first. A local shard is read into the
    memory of an earlier one that nothing holds any more (`shard_file.Buffers`): a consumer may
    keep what it is given as long as it likes. Pass the same `buffers` to every epoch's call to
    reuse that memory across them too (a new pool otherwise).
    """
    store = open_store(path)
    names = [store.spec.array(n).name for n in names]
    records = store.records()
    if verify:
        verify_store(store, records=records)
    complete = store.require_complete(
        allow_incomplete=allow_incomplete, records=records, names=names
    )
    checked = records if verify else [None] * len(records)
    added = _added_records(store, names, verify)
    order = shard_order(len(complete), seed=seed, epoch=epoch, rank=rank, world_size=world_size)

    buffers = Buffers() if buffers is None else buffers  # memory the consumer let go: reused

    def fetch(i: int) -> LatentArrays:
        return _shard_arrays(store, complete[i], checked[complete[i]], names, added, buffers)

    with ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch") as pool:
        ahead = [pool.submit(fetch, i) for i in order[:PREFETCH]]
        for k in range(len(order)):
            shard = ahead.pop(0).result()
            if k + PREFETCH < len(order):
                ahead.append(pool.submit(fetch, order[k + PREFETCH]))
            yield shard
