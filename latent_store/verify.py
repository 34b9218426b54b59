"""The verify step every reader runs: each shard against its record, the store against its seal.

    data = verify_shard(store, shard, record)   # a shard's arrays, or StoreCorruptError
    verify_store(store)                         # provenance, array layout, summary

A shard passes when it is readable, its record matches its place in the store, its bytes match
the record's checksum (of either kind in `store.CHECKSUMS`), its labels lie in [0, num_classes)
and it holds the fill value exactly at its recorded failures. `validate` reports the same problems as checks; readers
refuse with the first one, in one line that names the shard and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from latent_store.errors import LatentditError, StoreCorruptError, StoreReadError
from latent_store.provenance import UNSEALED, provenance_problems
from latent_store.schema import LABEL_FILL, ShardRecord
from latent_store.store import CHECKSUMS, LatentStore, checksum_algorithm, shard_checksum

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


def record_problems(store: LatentStore, shard: int, record: ShardRecord) -> list[str]:
    """A record that does not describe shard `shard` of this store (edited or misplaced)."""
    if not 0 <= shard < store.spec.num_shards:
        return [f"shard {shard}: a record beyond the store's {store.spec.num_shards} shards"]
    start, stop = store.spec.shard_bounds(shard)
    if (record.shard, record.start, record.stop) != (shard, start, stop):
        return [
            f"shard {shard}: its record describes shard {record.shard} [{record.start}, "
            f"{record.stop}), the store's layout says [{start}, {stop})"
        ]
    outside = [f.index for f in record.failures if not start <= f.index < stop]
    if outside:
        return [f"shard {shard}: its record lists failed sample {outside[0]} outside the shard"]
    return []


def check_shard(
    store: LatentStore, shard: int, record: ShardRecord
) -> tuple[dict[str, np.ndarray] | None, list[str], list[str]]:
    """Read and check one complete shard: (its arrays or None, data problems, label problems).

    The data is read first and its files looked up only when it fails its checksum (to name a
    missing one): on an object store each lookup is a request, and data that matches its
    checksum is what was written, whether zarr stored it or left it as the fill value.
    """
    if problems := record_problems(store, shard, record):
        return None, problems, []
    if (algorithm := checksum_algorithm(record.checksum)) is None:
        kind = record.checksum.partition(":")[0][:40]
        known = " or ".join(CHECKSUMS)
        return None, [f"shard {shard}: a checksum of unknown kind {kind!r} (known: {known})"], []
    try:
        data = store.read_shard(shard)
    except LatentditError:
        raise
    except Exception as e:  # whatever zarr's codecs raise on damaged bytes (crc32c, reshape...)
        reason = str(e).splitlines()[0][:120] if str(e) else ""
        unreadable = f"shard {shard}: unreadable ({type(e).__name__}: {reason})"
        return None, _lost(store, shard) or [unreadable], []
    problems = []
    if (actual := shard_checksum(data, algorithm)) != record.checksum:
        if lost := _lost(store, shard):
            return None, lost, []
        problems.append(
            f"shard {shard}: checksum mismatch (recorded {record.checksum}, data {actual})"
        )
    return data, problems, label_problems(store.spec.num_classes, record, data["labels"])


def _lost(store: LatentStore, shard: int) -> list[str]:
    """The shard's data files that are missing, as a problem ([] when all are there)."""
    lost = [k for k in store.shard_files(shard) if not store.has_key(k)]
    return [f"shard {shard}: data file missing ({', '.join(lost)})"] if lost else []


def verify_shard(store: LatentStore, shard: int, record: ShardRecord) -> dict[str, np.ndarray]:
    """The arrays of a complete shard after every check passed; else StoreCorruptError (one line)."""
    data, problems, labels = check_shard(store, shard, record)
    if problems or labels:
        fix = SHARD_FIX.format(path=store.path)
        raise StoreCorruptError(f"{store.path}: {'; '.join(problems + labels)}; {fix}")
    assert data is not None
    return data


def array_problems(store: LatentStore) -> list[str]:
    """Arrays missing, or whose shape, dtype or chunks disagree with the metadata."""
    spec = store.spec
    n, sample = spec.num_samples, spec.sample_shape
    want: dict[str, tuple[str | None, tuple, tuple]] = {
        "latents": ("uint8", (n, *sample), (spec.chunk_size, *sample)),
        "labels": ("int16", (n,), (spec.shard_size,)),
        "keys": (None, (n,), (spec.shard_size,)),
        "shard_records": (None, (spec.num_shards,), (1,)),
    }
    if spec.posterior == "moments":
        want["logstd"] = want["latents"]
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
    """A finalized summary (statistics the trainer normalizes with) that the records contradict."""
    from latent_store.writer import summarize_records

    if store.summary is None or any(r is None for r in records):
        return []  # not finalized yet, or incomplete (completion reports that)
    if _canonical(store.summary) != _canonical(summarize_records(store, records)):
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
