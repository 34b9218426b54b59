"""RUN/log.jsonl: one JSON record per line, appended with one write and an fsync per record.

A kill or a full disk while a record is appended can leave only its own line torn, the last one:
`read_records` drops it (one log line saying so); a resume then trims the log to its checkpoint's
step by replacing the file atomically. A garbled line before the last is damage that no crash
makes: it is refused, naming the line, and the file is left as it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from foundation.atomic import append_line, write_atomic
from foundation.errors import LatentditError
from foundation.faults import doing

log = logging.getLogger(__name__)


class RunLogError(LatentditError):
    """RUN/log.jsonl holds a garbled record before its last line."""


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _lines(path: Path, *, quiet: bool) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of each record of a log file, without a torn last line."""
    if not path.is_file():
        return []
    lines = path.read_bytes().decode(errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        record = _parse(line)
        if record is not None:
            kept.append((line, record))
        elif number == len(lines):
            if not quiet:
                log.warning("%s: dropped its torn last line (a run stopped while writing it)", path)
        elif line.strip():
            raise RunLogError(
                f"{path}: line {number} is not a log record ({line[:60]!r}); restore the file, "
                "or delete that line, then re-run"
            )
    return kept


def read_records(path: Path, *, quiet: bool = False) -> list[dict[str, Any]]:
    """The records of a log file ([] when there is none), without a torn last line."""
    return [record for _, record in _lines(path, quiet=quiet)]


def trim_log(path: Path, last_step: int) -> None:
    """Keep the records up to `last_step` (those after it belong to steps a resume redoes),
    byte for byte; the file is replaced atomically, and only when something goes."""
    if not path.is_file():
        return
    text = "".join(line + "\n" for line, r in _lines(path, quiet=False) if r["step"] <= last_step)
    if text.encode() != path.read_bytes():
        write_atomic(path, text)


def append_record(path: Path, record: dict[str, Any]) -> None:
    with doing(f"appending to {path}"):
        append_line(path, json.dumps(record))
