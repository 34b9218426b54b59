"""An ImageSource over webdataset tars (as img2dataset writes them), indexed once, read at random.

    latentdit encode shards/ --out store.zarr            # a folder of tars
    latentdit encode 'shards/{00000..00099}.tar' ...     # a brace pattern
    latentdit encode tars.txt ...                        # a file listing tar paths

When the source is opened every tar is indexed (`pipeline/tar_index.py`): sample i is then
(tar, byte offset, size) of its image member, so `read(i)` is one seek and one read. Samples
are numbered in shard-list order, then in member order inside each tar, so the encoder's split
of whole store shards across ranks and workers, and its resume, work exactly as for folders.

Only shards that img2dataset finished (`<shard>_stats.json` present) are used unless
`include_unfinished`. Damage never stops a run: a tar that ends early keeps the samples before
the cut; a sample without a readable label is left out and listed in `skipped`; an image member
cut short stays in the list and `read` raises OSError with the reason, which the encoder
records as that sample's failure.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from foundation import distributed
from foundation.files import DEFAULT_MAX_FILE_MB, MB, FileRefusedError
from latent_store import ClassInfo, LatentditError
from pipeline.download import CLASS_FILE_NAME, LABEL_FIELD, shard_stats_path, summarize_tars
from pipeline.imagenet import fingerprint, read_class_file
from pipeline.tar_index import Entry, Skipped, index_tars

log = logging.getLogger(__name__)

KIND = "webdataset"
TAR_SUFFIX = ".tar"
SKIPPED_SHOWN = 20  # skipped samples listed in describe(); all are counted
REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "pipe:")


class WebDatasetError(LatentditError):
    """The tar list cannot be resolved, or no usable sample is left in it."""


def is_webdataset_path(path: str | Path) -> bool:
    """Whether SOURCE names tars: a .tar file, a brace pattern, a folder holding tars, or a .txt list."""
    text = str(path)
    if "{" in text or "::" in text or text.endswith(TAR_SUFFIX):
        return True
    p = Path(text)
    if p.is_file() and p.suffix == ".txt":
        return True
    return p.is_dir() and any(p.glob("*" + TAR_SUFFIX))


def resolve_shards(spec: str | Path) -> list[Path]:
    """The tar paths a SOURCE names: folder (sorted *.tar), brace pattern, .txt list, or one tar."""
    from webdataset.shardlists import expand_urls

    text = str(spec)
    p = Path(text)
    if p.is_dir():
        shards = sorted(p.glob("*" + TAR_SUFFIX))
    elif "{" in text or "::" in text:
        shards = [Path(s) for s in expand_urls(text)]  # webdataset's rule: braces, "::" joins
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
    missing = [s for s in shards if not s.exists()]
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
        max_file_bytes: int = DEFAULT_MAX_FILE_MB * MB,
    ) -> None:
        self.spec = os.path.abspath(spec or shards[0].parent)
        self.max_file_bytes = max_file_bytes
        self.label_key = label_key
        self.include_unfinished = include_unfinished
        self.classes_file = Path(classes_file).resolve() if classes_file else None
        self.skipped: list[Skipped] = []
        self.shards = self._finished([Path(s).resolve() for s in shards])
        tars: list[int] = []
        entries: list[Entry] = []
        for t, (found, skipped) in enumerate(index_tars(self.shards, label_key)):
            tars += [t] * len(found)
            entries += found
            self.skipped += skipped
            for s in skipped:
                self._log("skipping %s: %s", s.key, s.reason)
        # flat arrays, not a million small objects: DataLoader workers fork this source
        self._keys = tuple(e.key for e in entries)
        self._labels = np.array([e.label for e in entries], np.int64)
        self._tar = np.array(tars, np.int32)
        self._offsets = np.array([e.offset for e in entries], np.int64)
        self._sizes = np.array([e.size for e in entries], np.int64)
        self._problems = {i: e.problem for i, e in enumerate(entries) if e.problem}
        if not entries:
            raise WebDatasetError(
                f"no usable samples in {self.spec} ({len(self.shards)} tar(s) used, "
                f"{len(self.skipped)} skipped): see the messages above"
            )
        self._classes = self._class_list()
        self._check_labels()
        log.info(
            "%s: %d samples in %d tars, %d skipped",
            self.spec,
            len(self._keys),
            len(self.shards),
            len(self.skipped),
        )

    # --- the ImageSource protocol ---------------------------------------------------------------

    @property
    def classes(self) -> tuple[ClassInfo, ...]:
        return self._classes

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, index: int) -> str:
        return self._keys[index]

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def read(self, index: int) -> bytes:
        """The image member's bytes; OSError if the tar was cut inside it, FileRefusedError if
        the member is over the size cap (it is not read)."""
        if index in self._problems:
            raise OSError(self._problems[index])
        size = int(self._sizes[index])
        if size > self.max_file_bytes:
            raise FileRefusedError(
                f"member too large: {size / MB:.3g} MB, over the cap of {self.max_file_bytes / MB:.3g} MB"
            )
        with open(self.shards[self._tar[index]], "rb") as f:
            f.seek(int(self._offsets[index]))
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"tar ends inside the member: {len(data)} of {size} bytes")
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
            "fingerprint": fingerprint(self._keys, self._labels.tolist()),
            "num_images": len(self._keys),
            "num_classes": len(self._classes),
            "skipped": len(self.skipped),
            "skipped_first": [f"{s.key}: {s.reason}" for s in self.skipped[:SKIPPED_SHOWN]],
            "download": summarize_tars(self.shards).to_dict(),  # what img2dataset lost, by reason
        }

    # --- building the index ---------------------------------------------------------------------

    def _finished(self, shards: list[Path]) -> list[Path]:
        """Drop (and log) tars img2dataset did not finish, unless told to keep them, and what is
        not a regular file (a FIFO would block the indexer forever)."""
        kept = []
        for shard in shards:
            if not shard.is_file():
                reason = "not a regular file (a FIFO, a device, a folder?): not read"
                self._log("skipping %s: %s", shard, reason)
                self.skipped.append(Skipped(key=shard.name, reason=reason))
            elif shard_stats_path(shard).exists():
                kept.append(shard)
            elif self.include_unfinished:
                self._log("using %s although it has no %s", shard, shard_stats_path(shard).name)
                kept.append(shard)
            else:
                reason = (
                    f"no {shard_stats_path(shard).name} next to it: img2dataset did not finish "
                    "this shard (run `latentdit download` again, or pass --include-unfinished)"
                )
                self._log("skipping %s: %s", shard, reason)
                self.skipped.append(Skipped(key=shard.name, reason=reason))
        return kept

    @staticmethod
    def _log(message: str, *args) -> None:
        """A warning, from rank 0 only (every rank opens the same source)."""
        if distributed.rank_and_world()[0] == 0:
            log.warning(message, *args)

    def _class_list(self) -> tuple[ClassInfo, ...]:
        """The classes file if given, else the classes.txt `latentdit download` wrote next to
        the tars, else classes named 0..max label."""
        if self.classes_file:
            return read_class_file(self.classes_file)
        beside = self.shards[0].parent / CLASS_FILE_NAME
        if beside.exists():
            return read_class_file(beside)
        top = int(self._labels.max())
        return tuple(ClassInfo(index=i, id=str(i)) for i in range(top + 1))

    def _check_labels(self) -> None:
        n = len(self._classes)
        bad = np.flatnonzero((self._labels < 0) | (self._labels >= n))
        if bad.size:
            i = int(bad[0])
            raise WebDatasetError(
                f"{self._keys[i]} has label {self._labels[i]}, outside the {n} classes "
                f"0..{n - 1}: pass the matching --classes file or fix --label-key"
            )


def open_webdataset(
    spec: str | Path,
    *,
    label_key: str = LABEL_FIELD,
    include_unfinished: bool = False,
    classes_file: Path | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_MB * MB,
) -> WebDatasetSource:
    """Resolve SOURCE (folder, brace pattern, list file or tar) and index its tars."""
    return WebDatasetSource(
        resolve_shards(spec),
        label_key=label_key,
        include_unfinished=include_unfinished,
        classes_file=classes_file,
        spec=str(spec),
        max_file_bytes=max_file_bytes,
    )
