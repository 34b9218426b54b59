"""The interface every image source offers the encoder: a fixed, indexable list of labeled images.

The encoder only ever asks for sample i of a list fixed before encoding starts, so work can be
split into whole store shards across ranks and DataLoader workers, and resumed, deterministically.
Implementations: class-folder trees and ImageNet layouts (`pipeline/imagenet.py`), webdataset
tars made by img2dataset (`pipeline/webdataset_source.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from latent_store import ClassInfo


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
