"""Arrays added to a complete store later, without re-encoding what it holds.

    store = add_array(store, ArraySpec(name="features", shape=(768, 256), quant=q, description=d))
    writer = AddedArrayWriter(store, "features", shards=owned)   # each rank its own shards
    for shard in writer.todo:
        writer.write_shard(shard, values)      # (n, [V,] *shape) rows; failed samples' ignored
    finalize_store(store)                      # one process, after every writer

`add_array` (one process) checks the store first (its seal, array layout, summary, every shard
complete), creates the array, its statistics rows and its records (`<name>_records`), then
declares it under "added_arrays" and extends the seal over that declaration
(`provenance.extend_seal`): the seal is never redone, so an edit of anything sealed before still
shows, and so does an edit of the new declaration. Re-running it with the same declaration
changes nothing (a crash in between is resumed); another array of that name is refused.

A writer owns whole shards, as the store's own writers do: it writes a shard's rows, then their
statistics row, then the shard's record, which names the base record it was written against (a
shard re-encoded since needs its rows written again). A crash leaves the shard unwritten, and
the next writer discards what it left. Readers that ask for the array verify each shard against
its record (`verify.check_shard`); `validate` checks every written shard.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from latent_store.arrays import RECORDS_SUFFIX, STATS_SUFFIX, ArraySpec
from latent_store.checksums import parts_checksum
from latent_store.errors import SchemaMismatchError, StoreSealError
from latent_store.provenance import PROVENANCE_KEY, extend_seal, provenance_problems
from latent_store.records import ShardRecord
from latent_store.schema import ADDED_KEY, ATTRS_KEY, LABEL_FILL
from latent_store.store import LatentStore, create_arrays, open_store
from latent_store.verify import check_shard, read_keys, verify_labels, verify_store
from latent_store.writer import ShardFiles, part_of, start_part

log = logging.getLogger(__name__)


def add_array(path: str | os.PathLike | LatentStore, array: ArraySpec) -> LatentStore:
    """Declare `array` on a complete, intact store and create it, empty; returns the store.

    Refuses (one line, nothing written) a store that fails its checks or is not complete, and
    a name the store already declares otherwise.
    """
    store = open_store(path)
    array = replace(array, added=True)
    if array.name in store.spec.names:
        have = store.spec.array(array.name)
        if have.added and have.to_attrs() == array.to_attrs():
            log.info("%s: array %r is declared already", store.path, array.name)
            return store
        raise SchemaMismatchError(
            f"{store.path}: the store has an array {array.name!r} already "
            f"({have.to_attrs()['shape']}, {have.dtype}); choose another name"
        )
    verify_store(store)
    store.require_complete()
    spec = store.spec.with_added(array)
    writable = store.reopen("r+")
    create_arrays(writable.group, spec, array, overwrite=True)  # over a crashed try's leftovers
    attrs = dict(writable.group.attrs[ATTRS_KEY])
    attrs[ADDED_KEY] = spec.to_attrs()[ADDED_KEY]
    attrs[PROVENANCE_KEY] = extend_seal(attrs)
    writable.group.attrs[ATTRS_KEY] = attrs
    added = store.reopen("r")
    if problems := provenance_problems(added.attrs, read_keys(added)):
        raise StoreSealError(f"{store.path}: the extended seal does not read back: {problems[0]}")
    log.info("%s: declared array %r %s %s", store.path, array.name, array.dtype, array.shape)
    return added


class AddedArrayWriter(ShardFiles):
    """Writes the shards a process owns of an array added to a store (`add_array`).

    On creation it checks the store (seal, layout; labels against the records) and discards
    owned shards of the array that are unfinished or fail verification: `todo` lists what is
    left to write, so a killed run resumes where it stopped.
    """

    def __init__(self, store: LatentStore, name: str, shards: Iterable[int] | None = None) -> None:
        self.store = store.reopen("r+")
        self.spec, self.array = self.store.spec, self.store.spec.array(name)
        if not self.array.added:
            raise SchemaMismatchError(
                f"{self.store.path}: {name!r} was made with the store: its own writer writes it"
            )
        verify_store(self.store, summary=False)
        owned = list(range(self.spec.num_shards) if shards is None else shards)
        self.base = self.store.records()
        self.store.require_complete(owned, records=self.base)
        self.labels = verify_labels(self.store)
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="added-stats")
        records = self.store.records(name)
        self.done = {i for i in owned if records[i] is not None and self._sound(i, records[i])}
        self.todo = [i for i in owned if i not in self.done]
        for shard in self.todo:
            self._discard(shard, [name])

    def _sound(self, shard: int, record: ShardRecord) -> bool:
        """Whether a written shard passes verification; a damaged one loses its record."""
        name = self.array.name
        added = {name: record}
        _, problems, _ = check_shard(self.store, shard, self.base[shard], names=[name], added=added)
        if problems:
            log.warning("rewriting %s of shard %d: %s", name, shard, "; ".join(problems))
            self.store.array(name + RECORDS_SUFFIX)[shard] = ""
        return not problems

    def write_shard(self, shard: int, values: np.ndarray, *, clipped: int | None = None):
        """Write one shard of the array, then its record; returns the record.

        values: (n, [V,] *shape) rows of the declared dtype for the shard's n samples; rows of
        failed samples are ignored (write zeros). clipped: quantized values the quantizer
        clipped (None: the codes at 0 or 255 count, which bound it from above).
        """
        start, stop = self.spec.shard_bounds(shard)
        name, expect = self.array.name, (stop - start, *self.spec.row_shape(self.array.name))
        if values.shape != expect or values.dtype != np.dtype(self.array.dtype):
            raise SchemaMismatchError(
                f"shard {shard}: {name} {values.dtype}{values.shape}, store wants "
                f"{self.array.dtype}{expect}"
            )
        values = np.ascontiguousarray(values)
        written = self.labels[start:stop] != LABEL_FILL
        checksum, stats = start_part(self.array, values, written, self._pool, True)
        self.store.array(name)[start:stop] = values
        stats = stats.result()
        self.store.array(name + STATS_SUFFIX)[shard] = stats[0]
        self._sync(shard, [name])
        part = part_of(self.array, values, written, clipped, checksum.result(), stats)
        record = ShardRecord(
            shard=shard,
            start=start,
            stop=stop,
            checksum=parts_checksum([part.checksum]),
            arrays={name: part},
            base=self.base[shard].digest(),
        )
        self.store.array(name + RECORDS_SUFFIX)[shard] = record.to_json()
        self.done.add(shard)
        return record
