"""Regular files only: list folders of images safely, and read one file with a size cap.

    listing = list_regular_files(tree, [tree / c for c in classes], keep=is_image_name)
    listing.files[tree / "n01440764"]          # sorted paths: each real file once
    listing.skipped                            # what was left out, and why
    data = read_regular_file(path, max_bytes=256 * 2**20)

A folder of images may hold what is no file: a FIFO (opening it blocks until a writer comes), a
socket, a device (`/dev/zero` reads forever), symlinks to those, symlinks to a folder above them
(a loop: walking it never ends), and several links to one file. Listing takes regular files and
symlinks to regular files, each real file (device, inode) once: under its own path rather than
a link's, else under the first path in sorted order. It walks the given folders of a tree first without following any link; links to folders
are then followed only to folders outside the tree that it has not seen (each once), so a loop,
through one link or several, is detected and never walked, and a link inside the tree never
moves files to another class folder. It stats, and never opens, what it lists.

`read_regular_file` checks again at open (a tree may change after it was listed), without
blocking on a FIFO, and reads at most the cap.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_FILE_MB = 256  # far above any real image file; bounds what one read can take
MB = 2**20
SPECIAL = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
           stat.S_ISBLK: "a block device"}  # fmt: skip
SKIP_KINDS = ("not a regular file", "symlink loop", "folder listed elsewhere", "duplicate file",
              "dangling symlink", "unreadable")  # fmt: skip


class FileRefusedError(ValueError):
    """A file that is not read: not a regular file, or over the size cap. The message is the
    reason a caller records."""


@dataclass(frozen=True)
class Skipped:
    """A path left out of a listing: `kind` is one of SKIP_KINDS, `detail` says more."""

    path: Path
    kind: str
    detail: str = ""

    @property
    def reason(self) -> str:
        return f"{self.kind} ({self.detail})" if self.detail else self.kind


@dataclass
class Listing:
    """The regular files under each listed folder (sorted paths), and what was skipped."""

    files: dict[Path, list[Path]] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Skipped paths by kind."""
        return dict(Counter(s.kind for s in self.skipped))


def _what(mode: int) -> str:
    return next((name for test, name in SPECIAL.items() if test(mode)), "not a file or folder")


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def list_regular_files(
    tree: Path,
    folders: Sequence[Path] | None = None,
    *,
    keep: Callable[[str], bool],
    recursive: bool = True,
) -> Listing:
    """The regular files (and symlinks to them) whose name `keep` accepts, under each of
    `folders` of `tree` (default: the tree itself), and their sub-folders unless not
    `recursive`; see the module docstring.

    Files whose name `keep` refuses are ignored silently, whatever they are; the paths skipped
    are returned in `Listing.skipped`, with their reason, for the caller to log.
    """
    folders = [Path(tree)] if folders is None else [Path(f) for f in folders]
    walk = _Walk(Path(tree), keep, recursive)
    above = () if folders == [Path(tree)] else (_ident(os.stat(tree)),)
    for owner in sorted(range(len(folders)), key=lambda i: folders[i].is_symlink()):
        walk.enter(folders[owner], owner, above)  # real folders first, then links to folders
    while walk.links:  # every folder of the trees is known now: follow links to folders
        walk.follow(*walk.links.popleft())
    walk.classify_inner_links()
    listing = Listing(skipped=walk.skipped)
    seen: dict[tuple[int, int], Path] = {}
    kept: dict[int, list[Path]] = {owner: [] for owner in range(len(folders))}
    for _, owner, path, ident in sorted(walk.found):  # paths without links first
        if ident in seen:
            same = shown_path(seen[ident], Path(tree))
            listing.skipped.append(Skipped(path, "duplicate file", f"same file as {same}"))
        else:
            seen[ident] = path
            kept[owner].append(path)
    listing.files = {Path(f): sorted(kept[owner]) for owner, f in enumerate(folders)}
    return listing


def shown_path(path: Path, tree: Path) -> str:
    """`path` relative to `tree` when it is inside it (posix), else as it is."""
    return path.relative_to(tree).as_posix() if path.is_relative_to(tree) else str(path)


class _Walk:
    """The state of one listing: folders seen (by device and inode), files found per folder of
    the caller (`owner`), links to folders still to follow, what was skipped."""

    def __init__(self, tree: Path, keep: Callable[[str], bool], recursive: bool) -> None:
        self.tree, self.keep, self.recursive = Path(os.path.realpath(tree)), keep, recursive
        self.folders: set[tuple[int, int]] = set()
        self.found: list[tuple[bool, int, Path, tuple[int, int]]] = []  # linked, owner, path, id
        self.links: deque[tuple[Path, int, tuple]] = deque()
        self.inner: list[tuple[Path, Path, Path]] = []  # links into the tree: link, from, to
        self.skipped: list[Skipped] = []

    def enter(self, folder: Path, owner: int, above: tuple, *, linked: bool = False) -> None:
        """List `folder` and, depth first, its real sub-folders; queue the links met. `above`:
        the identities of the folders above `folder`, through the links followed to it;
        `linked`: reached through a link."""
        todo = [(folder, above)]
        while todo:
            folder, above = todo.pop()
            try:
                ident = _ident(os.stat(folder))
                if ident in above:
                    self.skipped.append(Skipped(folder, "symlink loop", "a folder above it"))
                    continue
                if ident in self.folders:  # reached again (a bind mount, a folder given twice)
                    self.skipped.append(Skipped(folder, "folder listed elsewhere"))
                    continue
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as e:
                self.skipped.append(Skipped(folder, "unreadable", e.strerror or str(e)))
                continue
            self.folders.add(ident)
            inside = (*above, ident)
            subfolders = []
            for entry in entries:
                path = Path(entry.path)
                try:
                    if entry.is_symlink():
                        self.links.append((path, owner, inside))
                    elif entry.is_dir(follow_symlinks=False):
                        subfolders.append((path, inside))
                    elif self.keep(entry.name):
                        self._file(path, owner, entry.stat(follow_symlinks=False), linked=linked)
                except OSError as e:
                    self.skipped.append(Skipped(path, "unreadable", e.strerror or str(e)))
            if self.recursive:
                todo.extend(reversed(subfolders))

    def follow(self, link: Path, owner: int, above: tuple) -> None:
        """A symlink met by `enter`: a regular file is found, a new folder entered."""
        try:
            st = os.stat(link)
        except OSError as e:
            if self.keep(link.name):
                kind = "symlink loop" if e.errno == errno.ELOOP else "dangling symlink"
                self.skipped.append(Skipped(link, kind, f"-> {os.readlink(link)}"))
            return
        if not stat.S_ISDIR(st.st_mode):
            if self.keep(link.name):
                self._file(link, owner, st, linked=True)
            return
        if not self.recursive:
            return
        target, real = os.readlink(link), Path(os.path.realpath(link))
        here = Path(os.path.realpath(link.parent))
        if _ident(st) in above or real == here or real in here.parents:
            self.skipped.append(Skipped(link, "symlink loop", f"-> {target}, a folder above it"))
        elif real == self.tree or self.tree in real.parents:
            self.inner.append((link, here, real))  # listed where it is; a loop? see below
        elif _ident(st) in self.folders:
            self.skipped.append(Skipped(link, "folder listed elsewhere", f"-> {target}"))
        else:
            self.enter(link, owner, above, linked=True)

    def classify_inner_links(self) -> None:
        """Skip the links to folders of the tree: loops (through several links: following it,
        and the links met on the way, leads back to its own folder), or folders listed where
        they are. None of them is followed."""

        def within(path: Path, folders: set[Path]) -> bool:
            return any(path == f or f in path.parents for f in folders)

        for link, here, real in self.inner:
            reach, grew = {real}, True
            while grew and not within(here, reach):  # what following `link` would walk
                more = {to for _, at, to in self.inner if within(at, reach) and to not in reach}
                reach, grew = reach | more, bool(more)
            target = os.readlink(link)
            if within(here, reach):
                self.skipped.append(Skipped(link, "symlink loop", f"-> {target}, through links"))
            else:
                detail = f"-> {target}, in the tree: listed where it is"
                self.skipped.append(Skipped(link, "folder listed elsewhere", detail))

    def _file(self, path: Path, owner: int, st: os.stat_result, *, linked: bool) -> None:
        if stat.S_ISREG(st.st_mode):
            self.found.append((linked, owner, path, _ident(st)))
        else:
            via = "symlink to " if path.is_symlink() else ""
            self.skipped.append(Skipped(path, "not a regular file", via + _what(st.st_mode)))


def read_regular_file(path: str | os.PathLike, *, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; FileRefusedError for anything else.

    Opened non-blocking (a FIFO put there after listing cannot block the open) and checked on
    the open descriptor; at most max_bytes + 1 bytes are read, so a file growing meanwhile is
    refused too. OSError if it cannot be opened or read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefusedError(f"not a regular file ({_what(st.st_mode)})")
        if st.st_size > max_bytes:
            raise FileRefusedError(_too_big(st.st_size, max_bytes))
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileRefusedError(_too_big(len(data), max_bytes))
    return data


def _too_big(size: int, max_bytes: int) -> str:
    return f"file too large: {size / MB:.3g} MB, over the cap of {max_bytes / MB:.3g} MB"
