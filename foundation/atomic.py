"""Crash-consistent writes: after a kill or a full disk at any instant, the old or the new file.

    write_atomic(run / "config.json", text)             # temp file, fsync, rename, fsync folder
    with atomic_file(out / "samples.npz") as f:          # the same, for a file written in pieces
        f.write(...)
    append_line(run / "log.jsonl", json.dumps(record))  # one write; a kill leaves at most a torn
                                                        # last line, which readers drop

A rename replaces a file in one step (POSIX, and NFS), but only a flushed file and a flushed
folder survive a power loss as what was renamed: hence the fsyncs. A failed write removes its
temporary file, so a full disk is not made fuller, and the old file stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TMP_MARK = ".tmp-"  # temporary names: .NAME.tmp-PID (files) or .tmp-... (folders)


def temp_name(path: Path) -> Path:
    """The temporary sibling a write of `path` goes through (hidden, unique to this process)."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def is_temp(path: Path) -> bool:
    """Whether `path` is a leftover of an interrupted atomic write (any process's)."""
    return path.name.startswith(".") and TMP_MARK in path.name


def fsync_file(path: Path) -> None:
    """Flush a written file's data to its device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to its device, where the OS can."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename itself is done
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write that appears at `path` only once complete and flushed.

    On any error (ENOSPC included) the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace `path` with `data` (text is written as UTF-8) in one step."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line with a single write, then fsync: a kill or a full disk leaves at most a
    torn last line (what `read_lines` drops), never a torn line before others."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):  # a short write: the disk filled up mid-line
            raise OSError(errno.ENOSPC, "No space left on device (short write)", str(path))
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temps(folder: Path) -> list[Path]:
    """Delete the leftovers of interrupted atomic writes directly in `folder`; returns them.

    Call only while holding the folder's lock: another writer's temporary file would go too.
    """
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_file() and is_temp(p)]
    for p in found:
        p.unlink(missing_ok=True)
    return found
