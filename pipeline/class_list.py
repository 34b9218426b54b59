"""Class-list files: one class per line, in label order.

    n01440764 tench, Tinca tinca
    n01443537 goldfish, Carassius auratus

Line i (counting non-empty lines from 0) is class i; its first whitespace-separated token is
the class id (a wnid, or any name without spaces), the rest of the line its human name. This
is the layout of ImageNet's `LOC_synset_mapping.txt`, so that file works as is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from latent_store import ClassInfo, LatentditError


class ClassFileError(LatentditError):
    """A class-list file is missing, empty or has duplicate ids."""


def read_class_file(path: str | os.PathLike) -> tuple[ClassInfo, ...]:
    """Parse a class-list file into ClassInfo records (index = line number among non-empty lines)."""
    path = Path(path)
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except OSError as e:
        raise ClassFileError(f"cannot read class file {path}: {e.strerror or e}") from None
    classes = []
    for line in filter(None, lines):
        cid, _, name = line.partition(" ")
        classes.append(ClassInfo(index=len(classes), id=cid, name=name.strip()))
    if not classes:
        raise ClassFileError(f"class file {path} lists no classes: write one class id per line")
    ids = [c.id for c in classes]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ClassFileError(f"class file {path} repeats class ids {dup}: each id must be unique")
    return tuple(classes)


def write_class_file(path: str | os.PathLike, classes: Sequence[ClassInfo]) -> Path:
    """Write `classes` in the format `read_class_file` reads."""
    path = Path(path)
    path.write_text("".join(f"{c.id} {c.name}".rstrip() + "\n" for c in classes), encoding="utf-8")
    return path
