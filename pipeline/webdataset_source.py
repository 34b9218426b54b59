"""An ImageSource over webdataset tars (as img2dataset writes them), indexed once, read at random.

    latentdit encode shards/ --out store.zarr            # a folder of tars
    latentdit encode 'shards/{00000..00099}.tar' ...     # a brace pattern
    latentdit encode tars.txt ...                        # a file listing tar paths

At construction every tar is scanned once with `tarfile` (headers, plus the small label members):
sample i is then (tar, byte offset, size) of its image member, so `read(i)` is one seek and one
read. Samples are numbered in shard-list order, then in member order inside each tar, so the
encoder's split of whole store shards across ranks and workers, and its resume, work exactly as
for folders. Members are grouped into samples by webdataset's own key/extension convention.

Only shards that img2dataset finished (`<shard>_stats.json` present) are used unless
`include_unfinished`. Damage never stops a run: a tar that ends early keeps the samples before
the cut; a sample without a readable label is left out and listed in `skipped`; an image member
cut short stays in the list and `read` raises OSError with the reason, which the encoder
records as that sample's failure.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latent_store import ClassInfo, LatentditError
from pipeline.download import CLASS_FILE_NAME, LABEL_FIELD, shard_stats_path
from pipeline.imagenet import fingerprint, read_class_file

log = logging.getLogger(__name__)

KIND = "webdataset"
TAR_SUFFIX = ".tar"
SKIPPED_SHOWN = 20  # skipped samples listed in describe(); all are counted
REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "pipe:")


class WebDatasetError(LatentditError):
    """The tar list cannot be resolved, or no usable sample is left in it."""


@dataclass(frozen=True)
class Skipped:
    """A sample (or a whole tar) left out of the source, and why."""

    key: str
    reason: str


@dataclass(frozen=True)
class _Entry:
    """One indexed sample: where its image bytes lie."""

    key: str
    label: int
    offset: int
    size: int
    problem: str | None = None  # set when the image member is cut short


def is_webdataset_path(path: str | Path) -> bool:
    """Whether SOURCE names tars: a .tar file, a brace pattern, a folder holding tars, or a .txt list."""
    text = str(path)
    if "{" in text or text.endswith(TAR_SUFFIX):
        return True
    p = Path(text)
    if p.is_file() and p.suffix == ".txt":
        return True
    return p.is_dir() and any(p.glob("*" + TAR_SUFFIX))


def resolve_shards(spec: str | Path) -> list[Path]:
    """The tar paths a SOURCE names: folder (sorted *.tar), brace pattern, .txt list, or one tar."""
    from braceexpand import braceexpand

    text = str(spec)
    p = Path(text)
    if p.is_dir():
        shards = sorted(p.glob("*" + TAR_SUFFIX))
    elif "{" in text:
        shards = [Path(s) for s in braceexpand(text)]
    elif p.is_file() and p.suffix == ".txt":
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        names = [ln for ln in lines if ln and not ln.startswith("#")]
        remote = [n for n in names if n.startswith(REMOTE_PREFIXES)]
        if remote:
            raise WebDatasetError(
                f"{p} lists remote tars ({remote[0]}); only local paths are supported: "
                "copy the tars to a local or mounted disk and list those paths"
            )
        shards = [Path(n) if Path(n).is_absolute() else p.parent / n for n in names]
    else:
        shards = [p]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise WebDatasetError(
            f"{len(missing)} tar(s) named by {text} do not exist, e.g. {missing[0]}: check the path"
        )
    if not shards:
        raise WebDatasetError(f"{text} names no tars (expected *.tar files)")
    if len(set(shards)) != len(shards):
        raise WebDatasetError(f"{text} names some tars twice: each tar may appear once")
    return shards


class WebDatasetSource:
    """Map-style ImageSource over webdataset tars; see the module docstring."""

    def __init__(
        self,
        shards: Sequence[Path],
        *,
        label_key: str = LABEL_FIELD,
        include_unfinished: bool = False,
        classes_file: Path | None = None,
        spec: str = "",
    ) -> None:
        self.spec = os.path.abspath(spec or shards[0].parent)
        self.label_key = label_key
        self.include_unfinished = include_unfinished
        self.classes_file = Path(classes_file).resolve() if classes_file else None
        self.skipped: list[Skipped] = []
        self.shards = self._finished([Path(s).resolve() for s in shards])
        self._tar: list[int] = []
        self._entries: list[_Entry] = []
        for t, shard in enumerate(self.shards):
            for entry in self._index_tar(shard):
                self._tar.append(t)
                self._entries.append(entry)
        if not self._entries:
            raise WebDatasetError(
                f"no usable samples in {self.spec} ({len(self.shards)} tar(s) used, "
                f"{len(self.skipped)} skipped): see the messages above"
            )
        self._classes = self._class_list()
        self._check_labels()
        log.info(
            "%s: %d samples in %d tars, %d skipped",
            self.spec,
            len(self._entries),
            len(self.shards),
            len(self.skipped),
        )

    # --- the ImageSource protocol ---------------------------------------------------------------

    @property
    def classes(self) -> tuple[ClassInfo, ...]:
        return self._classes

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, index: int) -> str:
        return self._entries[index].key

    def label(self, index: int) -> int:
        return self._entries[index].label

    def read(self, index: int) -> bytes:
        """The image member's bytes; OSError if the tar was cut inside it."""
        entry = self._entries[index]
        if entry.problem:
            raise OSError(entry.problem)
        with open(self.shards[self._tar[index]], "rb") as f:
            f.seek(entry.offset)
            data = f.read(entry.size)
        if len(data) != entry.size:
            raise OSError(f"tar ends inside the member: {len(data)} of {entry.size} bytes")
        return data

    def describe(self) -> Mapping[str, Any]:
        """kind, path and the options that reopen it, the tars used, a fingerprint, counts."""
        return {
            "kind": KIND,
            "path": self.spec,
            "label_key": self.label_key,
            "include_unfinished": self.include_unfinished,
            "classes_file": str(self.classes_file) if self.classes_file else None,
            "shards": [str(s) for s in self.shards],
            "fingerprint": fingerprint(
                [e.key for e in self._entries], [e.label for e in self._entries]
            ),
            "num_images": len(self._entries),
            "num_classes": len(self._classes),
            "skipped": len(self.skipped),
            "skipped_first": [f"{s.key}: {s.reason}" for s in self.skipped[:SKIPPED_SHOWN]],
        }

    # --- building the index ---------------------------------------------------------------------

    def _finished(self, shards: list[Path]) -> list[Path]:
        """Drop (and log) tars img2dataset did not finish, unless told to keep them."""
        kept = []
        for shard in shards:
            if shard_stats_path(shard).exists():
                kept.append(shard)
            elif self.include_unfinished:
                log.warning("using %s although it has no %s", shard, shard_stats_path(shard).name)
                kept.append(shard)
            else:
                reason = (
                    f"no {shard_stats_path(shard).name} next to it: img2dataset did not finish "
                    "this shard (run `latentdit download` again, or pass --include-unfinished)"
                )
                log.warning("skipping %s: %s", shard, reason)
                self.skipped.append(Skipped(key=shard.name, reason=reason))
        return kept

    def _index_tar(self, shard: Path) -> Iterator[_Entry]:
        """Index one tar: an _Entry per usable sample; problems go to `self.skipped`."""
        from webdataset.autodecode import IMAGE_EXTENSIONS
        from webdataset.tariterators import group_by_keys

        def note(exn: Exception) -> bool:  # webdataset handler: record, then go on
            self._skip(shard.name, f"bad tar member: {exn}")
            return True

        for sample in group_by_keys(self._members(shard), handler=note):
            key = f"{shard.name}/{sample['__key__']}"
            image = next((ext for ext in sample if ext in IMAGE_EXTENSIONS), None)
            if image is None:
                self._skip(key, "no image member")
                continue
            try:
                label = self._read_label(sample)
            except (ValueError, KeyError, TypeError, OSError) as e:
                self._skip(key, f"no usable label: {e}")
                continue
            offset, size, problem = sample[image]
            yield _Entry(key=key, label=label, offset=offset, size=size, problem=problem)

    def _members(self, shard: Path) -> Iterator[dict]:
        """The tar's regular files as webdataset file records; the data of an image member is
        its (offset, size, problem); a cut or unreadable tar ends the listing, with a note."""
        end = shard.stat().st_size
        count = 0
        try:
            with tarfile.open(shard, "r:") as tf:
                for info in tf:
                    if not info.isreg():
                        continue
                    count += 1
                    cut = info.offset_data + info.size > end
                    problem = f"tar cut inside {info.name} at byte {end}" if cut else None
                    if info.name.lower().endswith((".cls", ".json")):
                        data = None if cut else tf.extractfile(info).read()  # type: ignore[union-attr]
                    else:
                        data = (info.offset_data, info.size, problem)
                    yield {"fname": info.name, "data": data, "__url__": str(shard)}
        except (tarfile.TarError, OSError, EOFError) as e:
            self._skip(shard.name, f"tar unreadable after {count} members ({e}); earlier ones kept")

    def _read_label(self, sample: dict) -> int:
        """Class index from a .cls member, else from the json member's `label_key` field."""
        if "cls" in sample:
            raw = sample["cls"]
            if raw is None:
                raise OSError("the .cls member is cut short")
            return int(raw.decode().strip())
        if "json" not in sample or sample["json"] is None:
            raise KeyError(f"no .cls member and no complete .json member with {self.label_key!r}")
        meta = json.loads(sample["json"])
        if self.label_key not in meta:
            raise KeyError(f"json has no field {self.label_key!r} (set --label-key)")
        return int(meta[self.label_key])

    def _skip(self, key: str, reason: str) -> None:
        log.warning("skipping %s: %s", key, reason)
        self.skipped.append(Skipped(key=key, reason=reason))

    def _class_list(self) -> tuple[ClassInfo, ...]:
        """The classes file if given, else the classes.txt `latentdit download` wrote next to
        the tars, else classes named 0..max label."""
        if self.classes_file:
            return read_class_file(self.classes_file)
        beside = self.shards[0].parent / CLASS_FILE_NAME
        if beside.exists():
            return read_class_file(beside)
        top = max(e.label for e in self._entries)
        return tuple(ClassInfo(index=i, id=str(i)) for i in range(top + 1))

    def _check_labels(self) -> None:
        n = len(self._classes)
        bad = next((e for e in self._entries if not 0 <= e.label < n), None)
        if bad is not None:
            raise WebDatasetError(
                f"{bad.key} has label {bad.label}, outside the {n} classes 0..{n - 1}: "
                "pass the matching --classes file or fix --label-key"
            )


def open_webdataset(
    spec: str | Path,
    *,
    label_key: str = LABEL_FIELD,
    include_unfinished: bool = False,
    classes_file: Path | None = None,
) -> WebDatasetSource:
    """Resolve SOURCE (folder, brace pattern, list file or tar) and index its tars."""
    return WebDatasetSource(
        resolve_shards(spec),
        label_key=label_key,
        include_unfinished=include_unfinished,
        classes_file=classes_file,
        spec=str(spec),
    )
