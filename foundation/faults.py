"""Faults of the machine, not of the input: a full disk, no memory, an object store that is down.

    with resource_faults("encoding into s3://b/x.zarr", intact="complete shards are kept",
                         resume="re-run the same command: latentdit encode ..."):
        ...
            with doing(f"writing shard {i}"):   # deeper: names the work under way
                ...

turns such a failure into one `ResourceError` line saying what failed, what is intact, and the
command that resumes; the CLI prints it without a traceback and exits 2. Anything else passes
through unchanged. `describe_fault` is the one test of what counts as such a fault (the CLI uses
it too, for commands that name no context).
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from foundation.errors import LatentditError

log = logging.getLogger(__name__)

OUT_OF_SPACE = {errno.ENOSPC: "out of space", errno.EDQUOT: "over the disk quota"}
# what errors that do not chain the OSError say (torch's file writer, safetensors' Rust writer)
SPACE_TEXT = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT}
# packages whose exceptions mean the object store (or the way to it) failed
STORAGE_PACKAGES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "azure")


SPACE_REMEDY = "free some space"
MEMORY_REMEDY = "free memory (or use smaller batches)"
STORE_REMEDY = "check that the object store answers (endpoint, credentials, network)"
DOING_ATTR = "latentdit_doing"


class ResourceError(LatentditError):
    """The disk, the memory or the object store failed: says what, what is intact, and how to
    resume."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@dataclass(frozen=True)
class Fault:
    """A failure of the machine: what happened (one line) and what the user does about it."""

    kind: str  # "space", "memory" or "store"
    what: str
    remedy: str


def describe_fault(exc: BaseException) -> Fault | None:
    """The Fault anywhere in `exc`'s chain (a full disk, no memory, the object store), or None."""
    chain = list(_chain(exc))
    filename = next((e.filename for e in chain if isinstance(e, OSError) and e.filename), None)
    where = f" writing {filename}" if filename else ""
    for e in chain:
        if isinstance(e, OSError) and e.errno in OUT_OF_SPACE:
            return Fault("space", f"{OUT_OF_SPACE[e.errno]}{where} ({e.strerror})", SPACE_REMEDY)
    for e in chain:
        for text, code in SPACE_TEXT.items():
            if text in str(e):
                return Fault(
                    "space", f"{OUT_OF_SPACE[code]}{where} ({_first_line(e)})", SPACE_REMEDY
                )
    for e in chain:
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            return Fault("memory", f"out of memory ({_first_line(e)})", MEMORY_REMEDY)
    for e in chain:
        package = type(e).__module__.split(".")[0]
        if package in STORAGE_PACKAGES or isinstance(e, (ConnectionError, TimeoutError)):
            return Fault("store", f"object store request failed ({_first_line(e)})", STORE_REMEDY)
    return None


def note_doing(exc: BaseException, what: str) -> None:
    """Name the work under way ("writing checkpoint ...") for the ResourceError `exc` may become
    (the innermost name wins)."""
    if not hasattr(exc, DOING_ATTR):
        with contextlib.suppress(AttributeError, TypeError):
            setattr(exc, DOING_ATTR, what)


@contextlib.contextmanager
def doing(what: str) -> Iterator[None]:
    """`note_doing(exc, what)` for whatever is raised inside."""
    try:
        yield
    except Exception as e:
        note_doing(e, what)
        raise


@contextlib.contextmanager
def resource_faults(
    doing: str,
    *,
    intact: str | Callable[[], str],
    resume: str,
    also: tuple[type[LatentditError], ...] = (),
    remedies: dict[str, str] | None = None,
) -> Iterator[None]:
    """Raise a fault inside (`describe_fault`) as one ResourceError line: '{fault} while {doing};
    {intact}; {remedy}, then {resume}'. `intact` may be a function (called only then); `also`:
    LatentditErrors to complete the same way (e.g. a store read that kept failing); `remedies`:
    this command's own advice for a kind of fault (e.g. {"memory": "use --data stream"})."""
    try:
        yield
    except ResourceError:
        raise
    except Exception as e:
        if isinstance(e, also):
            fault = Fault("store", str(e).split("; ")[0], STORE_REMEDY)
        elif isinstance(e, LatentditError) or (fault := describe_fault(e)) is None:
            raise
        log.debug("%s", doing, exc_info=True)  # the traceback, for --verbose
        try:
            now = intact() if callable(intact) else intact
        except Exception:  # the disk or the store is what failed: say less, never mask the fault
            now = "what was finished before is kept"
        during = getattr(e, DOING_ATTR, doing)
        remedy = (remedies or {}).get(fault.kind, fault.remedy)
        raise ResourceError(f"{fault.what} while {during}; {now}; {remedy}, then {resume}") from e


class StoreNoiseFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" tracebacks of connections the object
    store dropped (aiohttp's tasks, after a failed request): the failure itself is reported in
    one line. Other asyncio errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or describe_fault(exc) is None
