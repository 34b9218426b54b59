"""The verify step every reader runs: each shard against its record, the store against its seal.

    data = verify_shard(store, shard, record, names=("latents",))   # arrays, or StoreCorruptError
    verify_store(store)                         # provenance, array layout, summary

A shard passes when it is readable, its record matches its place in the store, the bytes of the
arrays read match the record's checksums (of either kind in `checksums.CHECKSUMS`), its labels lie in
[0, num_classes) and it holds the fill value exactly at its recorded failures. A reader checks
the arrays it reads (and the labels): a v2 record has a checksum per array and one over those,
so it needs no other array; a v1 record's one checksum covers all of them, so all are read. An
added array's shard is checked against its own record, which must name the shard's current base
record. `validate` reports the same problems as checks; readers refuse with the first one, in
one line that names the shard and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from latent_store.arrays import BASE_RECORDS, LABELS
from latent_store.checksums import CHECKSUMS, checksum_algorithm, parts_checksum, shard_checksum
from latent_store.errors import LatentditError, StoreCorruptError, StoreReadError
from latent_store.finalize import summarize_records, summary_rows
from latent_store.provenance import UNSEALED, provenance_problems
from latent_store.schema import LABEL_FILL, ShardRecord
from latent_store.shard_file import Buffers
from latent_store.store import LatentStore, array_layouts

SHARD_FIX = (
    "run `latentdit validate {path}` for every problem, then re-run the store's encode command "
    "(it re-encodes damaged shards)"
)
SEAL_FIX = (
    "if it was written before seals existed, seal it with `latentdit validate {path} --seal` "
    "(it checks every shard first), else restore it from a copy or re-encode it"
)
STORE_FIX = (
    "run `latentdit validate {path}` for every problem; restore the store from a copy, or "
    "re-encode it with the same command and a new --out"
)


def label_problems(num_classes: int, record: ShardRecord, labels: np.ndarray) -> list[str]:
    """Labels outside [0, num_classes), and fill values that disagree with the recorded failures."""
    failed = np.zeros(len(labels), bool)
    rows = [f.index - record.start for f in record.failures]
    failed[[r for r in rows if 0 <= r < len(labels)]] = True
    problems = []
    out = np.flatnonzero((labels != LABEL_FILL) & ((labels < 0) | (labels >= num_classes)))
    if out.size:
        i = out[0]
        problems.append(
            f"shard {record.shard}: {out.size} labels outside [0, {num_classes}), "
            f"first {int(labels[i])} at sample {record.start + i}"
        )
    unwritten = np.flatnonzero((labels == LABEL_FILL) & ~failed)
    if unwritten.size:
        problems.append(
            f"shard {record.shard}: {unwritten.size} samples hold the fill value -1 without a "
            f"recorded failure, first at sample {record.start + unwritten[0]}"
        )
    relabeled = np.flatnonzero((labels != LABEL_FILL) & failed)
    if relabeled.size:
        problems.append(f"shard {record.shard}: {relabeled.size} failed samples carry a label")
    return problems


def record_problems(
    store: LatentStore, shard: int, record: ShardRecord, *, what: str = "its record"
) -> list[str]:
    """A record that does not describe shard `shard` of this store (edited or misplaced)."""
    if not 0 <= shard < store.spec.num_shards:
        return [f"shard {shard}: a record beyond the store's {store.spec.num_shards} shards"]
    start, stop = store.spec.shard_bounds(shard)
    if (record.shard, record.start, record.stop) != (shard, start, stop):
        return [
            f"shard {shard}: {what} describes shard {record.shard} [{record.start}, "
            f"{record.stop}), the store's layout says [{start}, {stop})"
        ]
    outside = [f.index for f in record.failures if not start <= f.index < stop]
    if outside:
        return [f"shard {shard}: its record lists failed sample {outside[0]} outside the shard"]
    return []


def check_shard(
    store: LatentStore,
    shard: int,
    record: ShardRecord,
    *,
    names: Sequence[str] | None = None,
    added: Mapping[str, ShardRecord | None] | None = None,
    buffers: Buffers | None = None,
) -> tuple[dict[str, np.ndarray] | None, list[str], list[str]]:
    """Read and check one complete shard: (its arrays or None, data problems, label problems).

    names: the arrays to read (default: those made with the store); the labels always. added:
    the shard's records of the added arrays among `names` (default: read here). The data is read
    first and its files looked up only when it fails its checksum (to name a missing one): on an
    object store each lookup is a request, and data that matches its checksum is what was
    written, whether zarr stored it or left it as the fill value. buffers: what a local shard is
    read into (`LatentStore.read_shard`).
    """
    spec = store.spec
    names = list(spec.base_names if names is None else names)
    extra = [n for n in names if spec.array(n).added]
    base = [n for n in names if n not in extra] if record.arrays else list(spec.base_names)
    if problems := record_problems(store, shard, record):
        return None, problems, []
    if added is None:
        added = {n: store.records(n)[shard] for n in extra}
    problems = _kind_problems(shard, [record, *(added[n] for n in extra if added[n])])
    problems += [f"shard {shard}: array {n!r} is not written" for n in extra if added[n] is None]
    if problems:
        return None, problems, []
    digests: dict[str, str] = {}  # what was hashed while it was read (local stores)
    try:
        data = store.read_shard(shard, base + extra, digests=digests, buffers=buffers)
    except LatentditError:
        raise
    except Exception as e:  # whatever zarr's codecs raise on damaged bytes (crc32c, reshape...)
        reason = str(e).splitlines()[0][:120] if str(e) else ""
        unreadable = f"shard {shard}: unreadable ({type(e).__name__}: {reason})"
        return None, _lost(store, shard, base + extra) or [unreadable], []
    problems = _checksum_problems(store, shard, record, data, [*base, LABELS], digests)
    for name in extra:
        problems += _added_problems(store, shard, record, added[name], name, data, digests)
    if problems and (lost := _lost(store, shard, base + extra)):
        return None, lost, []
    return data, problems, label_problems(spec.num_classes, record, data[LABELS])


def _kind_problems(shard: int, records: Sequence[ShardRecord]) -> list[str]:
    """Checksums of a kind this latentdit cannot compute."""
    for record in records:
        for checksum in (record.checksum, *(p.checksum for p in record.arrays.values())):
            if checksum_algorithm(checksum) is None:
                kind = checksum.partition(":")[0][:40]
                known = " or ".join(CHECKSUMS)
                return [f"shard {shard}: a checksum of unknown kind {kind!r} (known: {known})"]
    return []


def _checksum_problems(
    store: LatentStore,
    shard: int,
    record: ShardRecord,
    data: Mapping,
    names: list[str],
    digests: Mapping[str, str],
) -> list[str]:
    """The arrays `names` of `data` against a record's checksums (v1: one over all of them);
    `digests`: checksums of arrays hashed as they were read (`LatentStore.read_shard`)."""
    if not record.arrays:
        algorithm = checksum_algorithm(record.checksum)
        actual = shard_checksum({n: data[n] for n in names}, algorithm)
        if actual != record.checksum:
            return [f"shard {shard}: checksum mismatch (recorded {record.checksum}, data {actual})"]
        return []
    recorded = [*store.spec.base_names, LABELS]
    return _parts_problems(shard, record, data, names, recorded, digests)


def _parts_problems(
    shard: int,
    record: ShardRecord,
    data: Mapping,
    names: list[str],
    recorded: list[str],
    digests: Mapping[str, str],
) -> list[str]:
    """A v2 record: the parts of `names` against `data` (or against `digests`, made of the same
    bytes as they were read, where the record's kind matches), and the record's checksum against
    its parts (`recorded`, in order), so that no part of an array not read was edited either."""
    if sorted(record.arrays) != sorted(recorded):
        return [f"shard {shard}: its record covers {sorted(record.arrays)}, not {recorded}"]
    problems = []
    for name in names:
        part = record.arrays[name].checksum
        algorithm = checksum_algorithm(part)
        actual = digests.get(name, "")
        if checksum_algorithm(actual) != algorithm:
            actual = shard_checksum({name: data[name]}, algorithm)
        if actual != part:
            problems.append(
                f"shard {shard}: checksum mismatch in {name} (recorded {part}, data {actual})"
            )
    root = parts_checksum([record.arrays[n].checksum for n in recorded])
    if root != record.checksum:
        problems.append(
            f"shard {shard}: checksum mismatch (recorded {record.checksum}, its parts give {root})"
        )
    return problems


def _added_problems(
    store: LatentStore,
    shard: int,
    base: ShardRecord,
    record: ShardRecord,
    name: str,
    data: Mapping,
    digests: Mapping[str, str],
) -> list[str]:
    """An added array's shard against its own record, which must name the current base record."""
    if problems := record_problems(store, shard, record, what=f"{name}'s record"):
        return problems
    if record.base != base.digest():
        return [
            f"shard {shard}: array {name!r} was written for another version of the shard (it "
            "was re-encoded since); re-run the command that adds it"
        ]
    return _parts_problems(shard, record, data, [name], [name], digests)


def _lost(store: LatentStore, shard: int, names: list[str]) -> list[str]:
    """The shard's data files of `names` and the labels that are missing, as a problem ([] when
    all are there)."""
    files = [f for f in store.shard_files(shard, [*names, LABELS]) if "_stats/" not in f]
    lost = [k for k in files if not store.has_key(k)]
    return [f"shard {shard}: data file missing ({', '.join(lost)})"] if lost else []


def verify_shard(
    store: LatentStore,
    shard: int,
    record: ShardRecord,
    *,
    names: Sequence[str] | None = None,
    added: Mapping[str, ShardRecord | None] | None = None,
    buffers: Buffers | None = None,
) -> dict[str, np.ndarray]:
    """The arrays `names` (default: those made with the store) and labels of a complete shard
    after every check passed (`check_shard`); else StoreCorruptError (one line)."""
    data, problems, labels = check_shard(
        store, shard, record, names=names, added=added, buffers=buffers
    )
    if problems or labels:
        fix = SHARD_FIX.format(path=store.path)
        raise StoreCorruptError(f"{store.path}: {'; '.join(problems + labels)}; {fix}")
    assert data is not None
    return data


def array_problems(store: LatentStore) -> list[str]:
    """Arrays missing, or whose shape, dtype or chunks disagree with the metadata."""
    spec = store.spec
    n = spec.num_samples
    want: dict[str, tuple[str | None, tuple, tuple]] = {}
    for array in spec.arrays:
        want.update(array_layouts(spec, array))
    want[LABELS] = ("int16", (n,), (spec.shard_size,))
    want["keys"] = (None, (n,), (spec.shard_size,))
    want[BASE_RECORDS] = (None, (spec.num_shards,), (1,))
    problems = []
    for name, (dtype, shape, chunks) in want.items():
        try:
            arr = store.fetch(lambda name=name: store.array(name), f"{store.path}/{name}")
        except StoreCorruptError:
            problems.append(f"{name}/zarr.json is malformed (truncated or edited?)")
            continue
        except LatentditError as e:
            problems.append(str(e).removeprefix(f"{store.path}: "))
            continue
        if tuple(arr.shape) != shape:
            problems.append(f"{name}: shape {tuple(arr.shape)} does not match metadata {shape}")
        if dtype and str(arr.dtype) != dtype:
            problems.append(f"{name}: dtype {arr.dtype} does not match {dtype}")
        if tuple(arr.chunks) != chunks:
            problems.append(f"{name}: chunks {tuple(arr.chunks)} do not match {chunks}")
    return problems


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def summary_problems(store: LatentStore, records: Sequence[ShardRecord | None]) -> list[str]:
    """A finalized summary (statistics the trainer normalizes with) that the records, or the
    statistics rows it names, contradict (`latent_store.finalize`)."""
    if store.summary is None or any(r is None for r in records):
        return []  # not finalized yet, or incomplete (completion reports that)
    try:
        rows = summary_rows(store)
    except StoreReadError:
        raise
    except Exception as e:
        return [f"the statistics its summary names are unreadable ({type(e).__name__})"]
    if _canonical(store.summary) != _canonical(summarize_records(store, records, rows)):
        return ["its summary (counts, channel statistics) does not match the shard records"]
    return []


def read_keys(store: LatentStore) -> np.ndarray | None:
    """The sample keys, or None when the array is missing or unreadable."""
    try:
        return store.fetch(lambda: store.array("keys")[:], f"{store.path}/keys")
    except StoreReadError:  # the store cannot be reached: say so, not "edited"
        raise
    except Exception:
        return None


def store_problems(
    store: LatentStore,
    *,
    summary: bool = True,
    records: Sequence[ShardRecord | None] | None = None,
) -> list[str]:
    """Everything wrong with the store as a whole: array layout, seal, and (`summary`) summary.

    `records`: the shard records if the caller read them already (default: read them here).
    """
    problems = array_problems(store)
    problems += provenance_problems(store.attrs, None if problems else read_keys(store))
    if not summary:
        return problems
    return problems + summary_problems(store, store.records() if records is None else records)


def verify_store(
    store: LatentStore,
    *,
    summary: bool = True,
    records: Sequence[ShardRecord | None] | None = None,
) -> None:
    """Refuse (StoreCorruptError, one line) a store whose metadata was edited or is inconsistent."""
    _refuse(store, store_problems(store, summary=summary, records=records))


def verify_summary(store: LatentStore, records: Sequence[ShardRecord | None]) -> None:
    """Refuse a store whose summary the records contradict (`verify_store`'s last check)."""
    _refuse(store, summary_problems(store, records))


def _refuse(store: LatentStore, problems: list[str]) -> None:
    if problems:
        fix = (SEAL_FIX if UNSEALED in problems else STORE_FIX).format(path=store.path)
        raise StoreCorruptError(f"{store.path}: {'; '.join(problems)}; {fix}")


def verify_labels(store: LatentStore) -> np.ndarray:
    """All labels, checked shard by shard against the records (for readers of labels only)."""
    records = store.records()
    try:
        labels = store.array("labels")[:]
    except LatentditError:
        raise
    except Exception as e:
        fix = SHARD_FIX.format(path=store.path)
        raise StoreCorruptError(
            f"{store.path}: labels unreadable ({type(e).__name__}); {fix}"
        ) from None
    problems = []
    for shard, record in enumerate(records):
        if record is not None:
            start, stop = store.spec.shard_bounds(shard)
            problems += record_problems(store, shard, record)
            problems += label_problems(store.spec.num_classes, record, labels[start:stop])
    if problems:
        fix = SHARD_FIX.format(path=store.path)
        raise StoreCorruptError(f"{store.path}: {'; '.join(problems[:3])}; {fix}")
    return labels
