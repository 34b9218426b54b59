"""Index webdataset tars once: where each sample's image bytes lie, and its class label.

A tar is read with `tarfile` (headers, plus the small `.cls` / `.json` members); its members
are grouped into samples by webdataset's own key/extension rule (`group_by_keys`). Damage is
recorded, never raised: a cut or unreadable tar keeps the samples before the damage.
Python's tarfile parses about 2,000 headers/s per core, so under torchrun the ranks share the
indexing (each indexes every world-th tar) and exchange the results.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from foundation import distributed

LABEL_EXTENSIONS = (".cls", ".json")  # members read at indexing time; images are only located


@dataclass(frozen=True)
class Skipped:
    """A sample (or a whole tar) left out of the source, and why."""

    key: str
    reason: str


@dataclass(frozen=True)
class Entry:
    """One indexed sample: its label and where its image member's bytes lie in the tar."""

    key: str  # <tar name>/<webdataset key>
    label: int
    offset: int
    size: int
    problem: str | None = None  # set when the tar ends inside the image member


TarIndex = tuple[list[Entry], list[Skipped]]


def index_tars(shards: Sequence[Path], label_key: str) -> list[TarIndex]:
    """Index every tar, in order; under torchrun each rank indexes every world-th tar."""
    rank, world = distributed.rank_and_world()
    mine = {t: index_tar(shards[t], label_key) for t in range(rank, len(shards), world)}
    merged: dict[int, TarIndex] = {}
    for part in distributed.all_gather_objects(mine):
        merged.update(part)
    return [merged[t] for t in range(len(shards))]


def index_tar(shard: Path, label_key: str) -> TarIndex:
    """The usable samples of one tar, and what was left out of it (with the reason)."""
    from webdataset.autodecode import IMAGE_EXTENSIONS
    from webdataset.tariterators import group_by_keys

    entries: list[Entry] = []
    skipped: list[Skipped] = []

    def note(exn: Exception) -> bool:  # webdataset's handler protocol: record, then go on
        skipped.append(Skipped(shard.name, f"bad tar member: {exn}"))
        return True

    for sample in group_by_keys(_members(shard, skipped), handler=note):
        key = f"{shard.name}/{sample['__key__']}"
        image = next((ext for ext in sample if ext in IMAGE_EXTENSIONS), None)
        if image is None:
            skipped.append(Skipped(key, "no image member"))
            continue
        try:
            label = read_label(sample, label_key)
        except (ValueError, KeyError, TypeError) as e:
            skipped.append(Skipped(key, f"no usable label: {e}"))
            continue
        offset, size, problem = sample[image]
        entries.append(Entry(key=key, label=label, offset=offset, size=size, problem=problem))
    return entries, skipped


def _members(shard: Path, skipped: list[Skipped]) -> Iterator[dict]:
    """The tar's regular files as webdataset file records. A label member's data is its bytes
    (None if cut short); any other member's is (offset, size, problem)."""
    end = shard.stat().st_size
    count = 0
    try:
        with tarfile.open(shard, "r:") as tf:
            for info in tf:
                if not info.isreg():
                    continue
                count += 1
                cut = info.offset_data + info.size > end
                if info.name.lower().endswith(LABEL_EXTENSIONS):
                    data = None if cut else tf.extractfile(info).read()  # type: ignore[union-attr]
                else:
                    problem = f"tar cut inside {info.name} at byte {end}" if cut else None
                    data = (info.offset_data, info.size, problem)
                yield {"fname": info.name, "data": data, "__url__": str(shard)}
    except (tarfile.TarError, OSError, EOFError) as e:
        skipped.append(
            Skipped(shard.name, f"tar unreadable after {count} members ({e}); earlier ones kept")
        )


def read_label(sample: dict, label_key: str) -> int:
    """Class index from a `.cls` member, else from the `.json` member's `label_key` field."""
    if "cls" in sample:
        if sample["cls"] is None:
            raise ValueError("the .cls member is cut short")
        return int(sample["cls"].decode().strip())
    if sample.get("json") is None:
        raise KeyError(f"no .cls member and no complete .json member with {label_key!r}")
    meta = json.loads(sample["json"])
    if label_key not in meta:
        raise KeyError(f"json has no field {label_key!r} (set --label-key)")
    return int(meta[label_key])
