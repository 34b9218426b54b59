"""The interface every image source offers the encoder: a fixed, indexable list of labeled images.

The encoder only ever asks for sample i of a list fixed before encoding starts, so work can be
split into whole store shards across ranks and DataLoader workers, and resumed, deterministically.
Implementations: class-folder trees and ImageNet layouts (`pipeline/imagenet.py`), webdataset
tars made by img2dataset (`pipeline/webdataset_source.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from foundation.files import DEFAULT_MAX_FILE_MB, MB
from latent_store import ClassInfo

SOURCE_FILES = ("val_labels", "classes_file", "devkit_synsets")  # options kept in describe()
LABEL_KEY = "label"  # json field of a webdataset sample holding its class (what download writes)


@runtime_checkable
class ImageSource(Protocol):
    """A deterministic list of images with class labels."""

    @property
    def classes(self) -> tuple[ClassInfo, ...]:
        """The class list; a label is an index into it."""
        ...

    def __len__(self) -> int:
        """Number of samples (fixed once the source is built)."""
        ...

    def key(self, index: int) -> str:
        """Stable source id of sample `index` (relative path, or webdataset key)."""
        ...

    def label(self, index: int) -> int:
        """Class index of sample `index`, in [0, len(classes))."""
        ...

    def read(self, index: int) -> bytes:
        """The encoded image bytes of sample `index`; raises OSError if unreadable, and
        `foundation.files.FileRefusedError` (a ValueError) for what it refuses to read: a file
        that is no longer a regular file, or is over the source's size cap."""
        ...

    def describe(self) -> Mapping[str, Any]:
        """JSON-ready provenance for the store's `source` attribute: kind, path, a fingerprint
        of the file list (so a resume against a different source is refused), and counts."""
        ...


def open_source(
    path: str | Path,
    *,
    val_labels: Path | None = None,
    classes: Path | None = None,
    devkit_synsets: Path | None = None,
    label_key: str = LABEL_KEY,
    include_unfinished: bool = False,
    max_file_mb: float = DEFAULT_MAX_FILE_MB,
) -> ImageSource:
    """Pick the source kind from SOURCE: webdataset tars (a folder of them, a brace pattern or a
    .txt list), a flat val folder with `val_labels`, or class folders. Images (files, tar
    members) over `max_file_mb` are refused when read, never loaded."""
    from pipeline.imagenet import SourceError, class_folder_source, val_source
    from pipeline.webdataset_source import is_webdataset_path, open_webdataset

    max_bytes = int(max_file_mb * MB)
    if is_webdataset_path(path):
        if val_labels is not None or devkit_synsets is not None:
            raise SourceError(
                f"{path}: --val-labels and --devkit-synsets apply to image folders, not to tars; "
                "tar samples carry their label (--label-key)"
            )
        return open_webdataset(
            path,
            label_key=label_key,
            include_unfinished=include_unfinished,
            classes_file=classes,
            max_file_bytes=max_bytes,
        )
    path = Path(path)
    if not path.is_dir():
        problem = "not a folder" if path.exists() else "does not exist"
        raise SourceError(
            f"{path}: {problem}; SOURCE must be an image folder tree, a folder of webdataset "
            "tars, a brace pattern ('shards/{00000..00009}.tar') or a .txt list of tar paths"
        )
    if val_labels is not None:
        return val_source(
            path,
            val_labels=val_labels,
            classes_file=classes,
            devkit_synsets=devkit_synsets,
            max_file_bytes=max_bytes,
        )
    return class_folder_source(path, classes_file=classes, max_file_bytes=max_bytes)


def reopen_source(description: Mapping[str, Any]) -> ImageSource:
    """Open the source a store was encoded from, as recorded by its `describe()`."""
    files = {k: Path(description[k]) if description.get(k) else None for k in SOURCE_FILES}
    if description.get("kind") == "webdataset":
        from pipeline.webdataset_source import open_webdataset

        return open_webdataset(
            description["path"],
            label_key=description["label_key"],
            include_unfinished=description["include_unfinished"],
            classes_file=files["classes_file"],
        )
    return open_source(
        description["path"],
        val_labels=files["val_labels"],
        classes=files["classes_file"],
        devkit_synsets=files["devkit_synsets"],
    )
