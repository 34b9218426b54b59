"""Which checkpoint a run continues from: the one `latest` names if it is intact, else the newest
intact one, said in one log line; never none while a checkpoint folder exists.

    RUN/checkpoints/latest     text: a step folder's name, replaced atomically by each save
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from trainer.checkpoint_files import (
    CHECKPOINTS,
    DATA_FILES,
    LATEST,
    META,
    STEP_RE,
    CheckpointDamagedError,
    CheckpointNotFoundError,
    find_damage,
    refusal,
)

log = logging.getLogger(__name__)


def step_folders(folder: Path) -> list[Path]:
    """The step folders of RUN/checkpoints, oldest first."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and STEP_RE.fullmatch(p.name))


def _pointed(folder: Path) -> tuple[Path | None, str]:
    """(the step folder `latest` names, or None with why it names none)."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None, f"{pointer} is missing"
    try:
        name = pointer.read_bytes().decode(errors="replace").strip()
    except OSError as e:
        return None, f"{pointer} is unreadable ({e.strerror})"
    if not name:
        return None, f"{pointer} is empty"
    if not STEP_RE.fullmatch(name):
        return None, f"{pointer} is garbled ({name[:40]!r} is not a step folder)"
    if not (folder / name).is_dir():
        return None, f"{pointer} names {name}, which does not exist"
    return folder / name, ""


def latest_checkpoint(run_dir: str | os.PathLike, *, quiet: bool = False) -> Path | None:
    """The checkpoint a run continues from: the folder `RUN/checkpoints/latest` names when it is
    intact, else the newest intact one (saying so in one log line unless `quiet`); None when the
    run has no checkpoint folder at all.

    Raises CheckpointDamagedError when checkpoints exist but none is intact (a run never starts
    over beside its checkpoints), or when the named one was modified after it was written.
    """
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return None
    steps = step_folders(folder)
    named, why = _pointed(folder)
    if named is not None:
        damage = find_damage(named, [*DATA_FILES, META])
        if damage is None:
            return named
        if damage.modified:
            raise refusal(named, damage)
        why = f"{named} is damaged: {damage.file} {damage.reason}"
    elif not steps:
        return None
    problems = [why]
    for candidate in reversed(steps):
        if candidate == named:
            continue
        damage = find_damage(candidate, [*DATA_FILES, META])
        if damage is None:
            if not quiet:
                log.warning("%s; using the newest intact checkpoint, %s", why, candidate.name)
            return candidate
        problems.append(f"{candidate.name}/{damage.file} {damage.reason}")
    raise CheckpointDamagedError(
        f"{run_dir}: no intact checkpoint ({'; '.join(problems)}); restore one from a copy, or "
        "start a new --run"
    )


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder or a run dir (through `latest`)."""
    p = Path(path)
    if (p / META).is_file():
        if (damage := find_damage(p, [*DATA_FILES, META])) is not None:
            if damage.modified:
                raise refusal(p, damage)
            raise CheckpointDamagedError(
                f"{p / damage.file} {damage.reason}: the checkpoint is damaged; use another one "
                "(or its run dir: the newest intact checkpoint is used)"
            )
        return p
    found = latest_checkpoint(p)
    if found is None:
        raise CheckpointNotFoundError(
            f"{p}: no checkpoint here (expected a run dir with checkpoints/{LATEST} or a folder "
            f"with {META}); train first with `latentdit train --run {p}`"
        )
    return found
