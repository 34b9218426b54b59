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

from latent_store import ClassInfo

SOURCE_FILES = ("val_labels", "classes_file", "devkit_synsets")  # options kept in describe()


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
        """The encoded image bytes of sample `index`; raises OSError (or ValueError) if unreadable."""
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
) -> ImageSource:
    """Pick the source kind from SOURCE: a flat val folder with `val_labels`, or class folders."""
    from pipeline.imagenet import SourceError, class_folder_source, val_source

    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"{path}: not a folder; SOURCE must be an image folder tree")
    if val_labels is not None:
        return val_source(
            path, val_labels=val_labels, classes_file=classes, devkit_synsets=devkit_synsets
        )
    return class_folder_source(path, classes_file=classes)


def reopen_source(description: Mapping[str, Any]) -> ImageSource:
    """Open the source a store was encoded from, as recorded by its `describe()`."""
    files = {k: Path(description[k]) if description.get(k) else None for k in SOURCE_FILES}
    return open_source(
        description["path"],
        val_labels=files["val_labels"],
        classes=files["classes_file"],
        devkit_synsets=files["devkit_synsets"],
    )
