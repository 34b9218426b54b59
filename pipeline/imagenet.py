"""Image sources over folders: ImageNet train (`train/<wnid>/*.JPEG`), ImageNet val (a flat folder
plus a label file), and any class-folder dataset with files Pillow reads.

Labels: class index = position in the sorted list of class folders (the torchvision/Keras order
for ImageNet wnids), or the order of a `--classes` file so that different splits agree. Files are
listed once, sorted, and never re-listed; only image extensions count (`.DS_Store` and
`README.txt` are ignored), but images are decoded by content. Only regular files are listed, each
once, and symlink loops are never walked (`foundation.files`); what was left out is logged and
counted in `describe()`. A file over the size cap is not read (its sample fails with the reason).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from foundation.files import (
    DEFAULT_MAX_FILE_MB,
    MB,
    Listing,
    Skipped,
    list_regular_files,
    read_regular_file,
    shown_path,
)
from latent_store import ClassInfo, LatentditError

log = logging.getLogger(__name__)

SYNSET_MAPPING = "LOC_synset_mapping.txt"  # Kaggle: "n01440764 tench, Tinca tinca" per line
DEVKIT_META = "meta.mat"  # devkit: synsets in ILSVRC2012_ID order
WNID = re.compile(r"n\d{8}")  # an ImageNet synset id
SKIPPED_SHOWN = 20  # skipped paths listed in describe(); all are counted


class SourceError(LatentditError):
    """The source folder or a label file cannot be used as given."""


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions Pillow can open (".jpeg", ".png", ".webp", ...)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass(frozen=True, kw_only=True)
class FolderSource:
    """A fixed, sorted list of image files under `root`, each with a class index.

    keys are paths relative to `root` with forward slashes.
    """

    root: Path
    kind: str
    keys: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[ClassInfo, ...]
    options: Mapping[str, str | None]  # what reopens this source (label and class files)
    skipped: tuple[Skipped, ...] = ()  # paths left out of the listing (not regular files...)
    max_file_bytes: int = DEFAULT_MAX_FILE_MB * MB  # larger files are refused, never read

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, index: int) -> str:
        return self.keys[index]

    def label(self, index: int) -> int:
        return self.labels[index]

    def read(self, index: int) -> bytes:
        """The file's bytes; FileRefusedError (a ValueError) if it is no longer a regular file
        or is over the size cap, OSError if it cannot be read."""
        return read_regular_file(self.root / self.keys[index], max_bytes=self.max_file_bytes)

    def describe(self) -> dict[str, Any]:
        skipped = {}
        if self.skipped:  # only then: stores of sources without any keep their description
            skipped = {
                "skipped": len(self.skipped),
                "skipped_kinds": dict(Counter(s.kind for s in self.skipped)),
                "skipped_first": [
                    f"{shown_path(s.path, self.root)}: {s.reason}"
                    for s in self.skipped[:SKIPPED_SHOWN]
                ],
            }
        return {
            "kind": self.kind,
            "path": str(self.root),
            "fingerprint": fingerprint(self.keys, self.labels),
            "num_images": len(self.keys),
            "num_classes": len(self.classes),
            **{k: v for k, v in self.options.items() if v is not None},
            **skipped,
        }


def fingerprint(keys: Sequence[str], labels: Sequence[int]) -> str:
    """A digest of the (key, label) list, so a resume against another source can be refused."""
    h = hashlib.blake2b(digest_size=16)
    for k, y in zip(keys, labels, strict=True):
        h.update(f"{k}\t{y}\n".encode())
    return f"blake2b-128:{h.hexdigest()}"


def _is_main() -> bool:
    """Rank 0 (or no process group): every rank lists the source, rank 0 tells what it skipped."""
    from foundation.distributed import rank_and_world  # torch: not at import (`--help`)

    return rank_and_world()[0] == 0


def list_images(root: Path, folders: list[Path] | None = None, *, recursive=True) -> Listing:
    """The image files (by extension, not hidden) under `folders` of `root` (default: root),
    regular files only (`foundation.files.list_regular_files`); what was skipped is logged."""
    exts = image_extensions()

    def is_image(name: str) -> bool:
        return Path(name).suffix.lower() in exts and not name.startswith(".")

    listing = list_regular_files(root, folders, keep=is_image, recursive=recursive)
    if _is_main():
        for s in listing.skipped:
            log.warning("skipping %s: %s", shown_path(s.path, root), s.reason)
    return listing


def read_class_file(path: Path) -> tuple[ClassInfo, ...]:
    """Classes in file order: one per line, `ID [name...]` (LOC_synset_mapping.txt works as is)."""
    classes = []
    for line in _read_text(path).splitlines():
        if line.strip():
            cid, _, name = line.strip().partition(" ")
            classes.append(ClassInfo(index=len(classes), id=cid, name=name.strip()))
    if not classes:
        raise SourceError(f"{path}: no classes listed; write one class id (e.g. a wnid) per line")
    return tuple(classes)


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None


def _find_synset_names(*folders: Path) -> dict[str, str]:
    """wnid -> name from a LOC_synset_mapping.txt in any of `folders`, else {}."""
    for folder in folders:
        path = folder / SYNSET_MAPPING
        if path.is_file():
            return {c.id: c.name for c in read_class_file(path)}
    return {}


def _class_list(ids: Sequence[str], classes_file: Path | None, near: Path) -> tuple[ClassInfo, ...]:
    """The class list: the file's order if given, else sorted ids; names from a synset mapping."""
    if classes_file is not None:
        return read_class_file(classes_file)
    names = _find_synset_names(near, near.parent)
    return tuple(ClassInfo(index=i, id=c, name=names.get(c, "")) for i, c in enumerate(sorted(ids)))


def _source_kind(class_ids: Sequence[str]) -> str:
    return "imagenet-train" if all(WNID.fullmatch(c) for c in class_ids) else "folders"


def class_folder_source(
    root: Path, *, classes_file: Path | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_MB * MB
) -> FolderSource:
    """Every image below `root/<class>/` (recursively), labeled by its class folder."""
    root = Path(root).resolve()
    folders, loops = _class_folders(root)
    classes = _class_list(folders, classes_file, root)
    index = {c.id: c.index for c in classes}
    if unknown := [f for f in folders if f not in index]:
        raise SourceError(
            f"{root}: class folder {unknown[0]!r} is not in {classes_file} "
            f"({len(unknown)} such folders); add it there or remove the folder"
        )
    listing = list_images(root, [root / folder for folder in folders])
    keys, labels = [], []
    for folder in folders:
        for path in listing.files[root / folder]:
            keys.append(path.relative_to(root).as_posix())
            labels.append(index[folder])
    _require_images(root, keys)
    kind = _source_kind(folders)
    log.info(
        "%s: %d images in %d classes (%s), %d paths skipped",
        root,
        len(keys),
        len(folders),
        kind,
        len(loops) + len(listing.skipped),
    )
    return FolderSource(
        root=root,
        kind=kind,
        keys=tuple(keys),
        labels=tuple(labels),
        classes=classes,
        options={"classes_file": _abs(classes_file)},
        skipped=(*loops, *listing.skipped),
        max_file_bytes=max_file_bytes,
    )


def _class_folders(root: Path) -> tuple[list[str], list[Skipped]]:
    """The sorted names of the class folders of `root` (folders or links to folders, not hidden),
    and the links among them to `root` itself or above it: loops, skipped (and logged)."""
    names, loops = [], []
    for p in root.iterdir():
        if p.name.startswith(".") or not p.is_dir():
            continue
        real = p.resolve()
        if p.is_symlink() and (real == root or real in root.parents):
            loops.append(Skipped(p, "symlink loop", "a link to the source folder or above it"))
            if _is_main():
                log.warning("skipping %s: %s", p.name, loops[-1].reason)
            continue
        names.append(p.name)
    return sorted(names), loops


def _require_images(root: Path, keys: Sequence[str]) -> None:
    if not keys:
        raise SourceError(
            f"{root}: no images found (looked for class folders holding files with an image "
            "extension); point SOURCE at e.g. imagenet/train, or pass --val-labels for a flat "
            "folder of validation images"
        )


def _abs(path: Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def read_val_labels(path: Path, *, devkit_synsets: Path | None = None) -> dict[str, str]:
    """Image id (file stem) -> wnid, from Kaggle's LOC_val_solution.csv or the devkit ground truth.

    The devkit's `ILSVRC2012_validation_ground_truth.txt` holds 1-based ILSVRC2012_IDs that follow
    the order of the devkit's meta.mat, not the sorted wnids: they are mapped through the wnid,
    read from `devkit_synsets` (one wnid per line, in meta.mat order) or from a meta.mat beside
    the label file (needs scipy).
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return _read_kaggle_solution(path)
    synsets = _devkit_synsets(path, devkit_synsets)
    labels = {}
    for line_no, line in enumerate(_read_text(path).split(), start=1):
        ilsvrc_id = int(line) if line.isdigit() else 0
        if not 1 <= ilsvrc_id <= len(synsets):
            raise SourceError(
                f"{path}: line {line_no} holds {line!r}, not an id in 1..{len(synsets)}; is it "
                "ILSVRC2012_validation_ground_truth.txt?"
            )
        labels[f"ILSVRC2012_val_{line_no:08d}"] = synsets[ilsvrc_id - 1]
    return labels


def _read_kaggle_solution(path: Path) -> dict[str, str]:
    rows = list(csv.DictReader(_read_text(path).splitlines()))
    if not rows or not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise SourceError(
            f"{path}: expected the columns ImageId,PredictionString (LOC_val_solution.csv)"
        )
    if empty := [r["ImageId"] for r in rows if not (r["PredictionString"] or "").split()]:
        raise SourceError(f"{path}: no label for {empty[0]} (empty PredictionString)")
    return {r["ImageId"]: r["PredictionString"].split()[0] for r in rows}


def _devkit_synsets(labels_path: Path, synsets_file: Path | None) -> list[str]:
    if synsets_file is not None:
        return [c.id for c in read_class_file(synsets_file)]
    meta = labels_path.parent / DEVKIT_META
    if not meta.is_file():
        raise SourceError(
            f"{labels_path}: devkit ids need the meta.mat order of wnids; pass --devkit-synsets "
            f"FILE (one wnid per line, in meta.mat order) or put {DEVKIT_META} beside the labels"
        )
    try:
        from scipy.io import loadmat
    except ImportError:
        raise SourceError(
            f"reading {meta} needs scipy; pip install scipy or pass --devkit-synsets"
        ) from None
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    leaves = sorted(
        (int(s["ILSVRC2012_ID"]), str(s["WNID"])) for s in synsets if int(s["num_children"]) == 0
    )
    return [wnid for _, wnid in leaves]


def val_source(
    root: Path,
    *,
    val_labels: Path,
    classes_file: Path | None = None,
    devkit_synsets: Path | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_MB * MB,
) -> FolderSource:
    """A flat folder of validation images labeled through `val_labels` (see read_val_labels)."""
    root = Path(root).resolve()
    by_stem = read_val_labels(val_labels, devkit_synsets=devkit_synsets)
    listing = list_images(root, recursive=False)
    files = listing.files[root]
    _require_images(root, files)
    if missing := [p.name for p in files if p.stem not in by_stem]:
        raise SourceError(
            f"{val_labels}: no label for {len(missing)} images in {root}, e.g. {missing[0]}; "
            "is it the label file of this split?"
        )
    # all classes of a synset mapping beside the labels, else those the labels name
    ids = set(_find_synset_names(Path(val_labels).parent)) or set(by_stem.values())
    classes = _class_list(sorted(ids), classes_file, Path(val_labels).parent)
    index = {c.id: c.index for c in classes}
    if unknown := sorted({by_stem[p.stem] for p in files} - set(index)):
        where = classes_file or Path(val_labels).parent / SYNSET_MAPPING
        raise SourceError(f"{val_labels}: class {unknown[0]} is not in {where}")
    log.info("%s: %d validation images in %d classes", root, len(files), len(classes))
    return FolderSource(
        root=root,
        kind="imagenet-val",
        keys=tuple(p.name for p in files),
        labels=tuple(index[by_stem[p.stem]] for p in files),
        classes=classes,
        options={
            "val_labels": _abs(val_labels),
            "classes_file": _abs(classes_file),
            "devkit_synsets": _abs(devkit_synsets),
        },
        skipped=tuple(listing.skipped),
        max_file_bytes=max_file_bytes,
    )
