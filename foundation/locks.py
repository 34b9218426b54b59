"""Exclusive locks on what a command writes: a run dir (train), a store (encode), a sample folder.

    lock = Lock(run / RUN_LOCK, what=f"run {run}")
    lock.acquire()        # LockHeldError (one line naming the holder) if another process has it
    ...
    lock.release()        # only our own lock is removed; a no-op when not held

The lock is a small JSON file created exclusively (O_EXCL: atomic on local file systems and on
NFS v3 and later; at an fsspec URL a create-only write, which S3 does with If-None-Match) that
names its holder: host, pid, the process's start time, since when, and the command. Under
torchrun one process per job takes it (rank 0), so the job's other ranks never lock it out.

A lock whose holder is gone is stale. On the holder's own host that is certain (its pid is dead,
or belongs to a newer process, or the host rebooted) and the lock is taken over with one log
line. From another host it cannot be known: the refusal names the file to remove, the override
when you are sure the holder is gone (e.g. a node that crashed).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from foundation.errors import LatentditError
from foundation.urls import is_url, redact_storage_options

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
UNREADABLE_GRACE_S = 120.0  # an empty lock younger than this is being written by its taker
COMMAND_CHARS = 200


class LockHeldError(LatentditError):
    """Another process holds the lock of a run dir, a store or a sample folder."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: written into the lock file as JSON."""

    host: str
    pid: int
    started: float | None  # the process's start (clock ticks after boot; Linux), against pid reuse
    boot: str | None  # the host's boot id (Linux): a lock from before a reboot is stale
    since: str  # when the lock was taken (UTC)
    command: str
    token: str  # this acquisition's id: release removes only the lock it took

    @classmethod
    def me(cls) -> Holder:
        argv = " ".join(["latentdit", *redact_storage_options(sys.argv[1:])])
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=_start_time(os.getpid()),
            boot=_boot_id(),
            since=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            command=argv[:COMMAND_CHARS],
            token=uuid.uuid4().hex,
        )

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder a lock file names; None for an empty or garbled file."""
        try:
            fields = json.loads(data)
            return cls(**{k: fields[k] for k in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            return None

    def gone(self) -> bool:
        """Whether this holder certainly no longer runs (only knowable on its own host)."""
        if self.host != socket.gethostname():
            return False
        if self.boot and _boot_id() and self.boot != _boot_id():
            return True
        if not _alive(self.pid):
            return True
        now = _start_time(self.pid)
        return self.started is not None and now is not None and now != self.started

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since} ({self.command})"


def _boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> float | None:
    """A process's start time in clock ticks after boot (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return float(stat.rsplit(")", 1)[1].split()[19])  # fields after the command name, from 3


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class Lock:
    """An exclusive lock file at `path` (a local path or an fsspec URL); `what` names the locked
    thing in messages ("run runs/b2")."""

    def __init__(
        self, path: str | os.PathLike, *, what: str, storage_options: dict | None = None
    ) -> None:
        self.path, self.what = str(path), what
        self.storage_options = storage_options or {}
        self.holder: Holder | None = None

    # --- the file, local or at a URL ---------------------------------------------------------

    def _create(self, data: bytes) -> bool:
        """Create the lock file holding `data`; False when it exists already."""
        if is_url(self.path):
            fs, path = self._fs()
            try:
                with fs.open(path, "xb") as f:  # S3: a PUT with If-None-Match: *
                    f.write(data)
            except FileExistsError:
                return False
            except (ValueError, NotImplementedError):  # no create-only writes on this file system
                log.warning("%s: %s cannot be locked (no exclusive create there)", self.what, path)
                fs.pipe_file(path, data)
            return True
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        return True

    def _read(self) -> tuple[bytes, float] | None:
        """(contents, age in seconds) of the lock file, None when there is none. An object is
        written whole (one PUT): one that does not parse is garbage, as if old."""
        try:
            if is_url(self.path):
                fs, path = self._fs()
                return fs.cat_file(path), float("inf")
            with open(self.path, "rb") as f:
                return f.read(), time.time() - os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None

    def _remove(self) -> None:
        if is_url(self.path):
            fs, path = self._fs()
            fs.rm_file(path)
        else:
            Path(self.path).unlink(missing_ok=True)

    def _fs(self):
        from fsspec.core import url_to_fs

        return url_to_fs(self.path, **self.storage_options)

    # --- taking and leaving -----------------------------------------------------------------

    def acquire(self) -> Lock:
        """Take the lock, taking over a stale one; LockHeldError when another process holds it."""
        me = Holder.me()
        data = json.dumps(asdict(me), indent=1).encode()
        for _ in range(3):  # a stale lock removed, then one more try; a race lost: a third
            if self._create(data):
                self.holder = me
                return self
            found = self._read()
            if found is None:  # released meanwhile
                continue
            raw, age = found
            holder = Holder.parse(raw)
            if holder is None and age < UNREADABLE_GRACE_S:
                raise LockHeldError(
                    f"{self.what}: another process is taking its lock {self.path} right now; "
                    "wait for it, or remove the file if nothing else uses it"
                )
            if holder is not None and not holder.gone():
                raise LockHeldError(
                    f"{self.what} is in use by {holder.describe()}; wait for it to finish, or, "
                    f"if that process is gone (a crashed node), remove {self.path} and re-run"
                )
            again = self._read()
            if again is not None and again[0] == raw:  # still the stale one: take it over
                reason = holder.describe() if holder else "an unreadable lock file"
                log.warning("%s: taking over the stale lock %s of %s", self.what, self.path, reason)
                self._remove()
        raise LockHeldError(f"{self.what}: could not take its lock {self.path}; re-run")

    def release(self) -> None:
        """Remove the lock file if it is still the one this object took."""
        if self.holder is None:
            return
        token, self.holder = self.holder.token, None
        try:
            found = self._read()
            holder = Holder.parse(found[0]) if found else None
            if holder is None or holder.token != token:
                log.warning(
                    "%s: its lock %s was removed or taken over meanwhile", self.what, self.path
                )
                return
            self._remove()
        except Exception as e:  # e.g. the object store is down: the error being raised matters more
            log.warning(
                "%s: could not remove its lock %s (%s); remove it by hand", self.what, self.path, e
            )

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
