"""A checkpoint folder's files and errors, and whether the folder is intact, known cheaply: a
manifest written last, and file formats that show their own end (`trainer.checkpoint` writes
and loads checkpoints; `trainer.checkpoint_latest` picks the one a run continues from).

    RUN/checkpoints/0000004/manifest.json   {"format": ..., "files": {"state.pt": {"bytes": N,
                                             "xxh3_128": HEX}, ...}}   (written last)

Two kinds of damage, told apart because they call for opposite answers:
- incomplete: a file missing, cut short (a safetensors file shorter than its header says, a
  state.pt whose zip directory or pickle end is gone), an unreadable meta.json or manifest. What a
  crash or a full disk leaves: a resume falls back to the newest intact checkpoint.
- modified: complete files that differ from what was written (size or digest against the
  manifest), e.g. a state.pt replaced by another pickle. Never loaded; refused in one line.

The cheap check (sizes and formats: a few small reads) picks the checkpoint a run resumes from;
the digests (xxh3-128, GB/s) are checked only on the one that is loaded.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from foundation.atomic import fsync_file
from foundation.errors import LatentditError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META, STATE = "meta.json", "state.pt"
WEIGHTS = {"model": "model.safetensors", "ema": "ema.safetensors"}
DATA_FILES = [*WEIGHTS.values(), STATE]  # what manifest.json covers (meta.json may be hand-edited)
STEP_RE = re.compile(r"\d+")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "latentdit.checkpoint-manifest"
DIGEST = "xxh3_128"
READ_BLOCK = 16 << 20
SAFETENSORS_HEADER_MAX = 100 << 20  # safetensors' own limit on its JSON header


class CheckpointNotFoundError(LatentditError):
    """No checkpoint at the given path."""


class CheckpointMismatchError(LatentditError):
    """A checkpoint's format or provenance disagrees with what the caller expects."""


class CheckpointDamagedError(CheckpointMismatchError):
    """A checkpoint's files are cut short, missing, or not what latentdit wrote."""


@dataclass(frozen=True)
class Damage:
    """What is wrong with one file of a checkpoint folder."""

    file: str
    reason: str
    modified: bool
    """True: complete but not what was written (refuse); False: incomplete (fall back)."""


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, names: list[str]) -> None:
    """Record the size and digest of each of `names` in FOLDER/manifest.json (flushed): call it
    after every other file of the checkpoint is written and flushed."""
    files = {
        n: {"bytes": (folder / n).stat().st_size, DIGEST: file_digest(folder / n)} for n in names
    }
    path = folder / MANIFEST
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))
    fsync_file(path)


def _read_manifest(folder: Path) -> dict | Damage | None:
    """{name: {"bytes", DIGEST}}, a Damage for a garbled manifest, None for a checkpoint written
    before manifests existed."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_bytes())
        files = found["files"]
        assert found["format"] == MANIFEST_FORMAT and all(
            isinstance(v["bytes"], int) and isinstance(v[DIGEST], str) for v in files.values()
        )
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        return Damage(MANIFEST, "is unreadable (cut short?)", modified=False)
    return files


def _safetensors_complete(path: Path) -> str | None:
    """Why a safetensors file is incomplete (its header names bytes past its end), or None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is cut short ({size} bytes: no safetensors header)"
        (n,) = struct.unpack("<Q", head)
        if n > min(SAFETENSORS_HEADER_MAX, size - 8):
            return f"is cut short ({size} bytes, inside its header)"
        try:
            header = json.loads(f.read(n))
            end = max(
                (t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "is not a safetensors file (garbled header)"
    if size < 8 + n + end:
        return f"is cut short ({size} bytes, its header needs {8 + n + end})"
    return None


def _pickle_complete(path: Path) -> str | None:
    """Why a torch.save file is incomplete (no zip directory; a pickle without its end), or None.

    Nothing is unpickled: a zip's directory is read, a bare pickle's opcodes are walked.
    """
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            return f"is cut short or garbled (zip: {e})"
        return None
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in pickletools.genops(f):
                pass
    except Exception as e:  # genops raises ValueError and friends on a cut or garbled stream
        return f"is cut short or not a torch file ({str(e).splitlines()[0] if str(e) else e!r})"
    return None


def _json_complete(path: Path) -> str | None:
    try:
        json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        return f"is unreadable ({str(e).splitlines()[0]})"
    return None


FORMAT_CHECKS = {
    ".safetensors": _safetensors_complete,
    ".pt": _pickle_complete,
    ".json": _json_complete,
}


def find_damage(folder: Path, names: list[str], *, digests: bool = False) -> Damage | None:
    """The first damage among `names` in a checkpoint folder (see the module's docstring), or None.

    `digests`: also compare every file's digest with the manifest (reads every byte).
    """
    manifest = _read_manifest(folder)
    if isinstance(manifest, Damage):
        return manifest
    for name in dict.fromkeys([*names, *(manifest or {})]):  # and whatever else it lists
        path = folder / name
        if not path.is_file():
            return Damage(name, "is missing", modified=False)
        check = FORMAT_CHECKS.get(path.suffix)
        if check is not None and (why := check(path)) is not None:
            return Damage(name, why, modified=False)
        if manifest is None or name not in manifest:
            continue
        size, want = path.stat().st_size, manifest[name]
        if size != want["bytes"]:
            return Damage(name, f"has {size} bytes, {MANIFEST} says {want['bytes']}", modified=True)
        if digests and file_digest(path) != want[DIGEST]:
            return Damage(name, f"differs from its {DIGEST} digest in {MANIFEST}", modified=True)
    return None


def refusal(folder: Path, damage: Damage) -> CheckpointDamagedError:
    """The one-line refusal of a checkpoint whose complete files are not what was written."""
    path = folder / damage.file
    if damage.file == STATE:
        try:
            load_state(path)  # safe: weights_only; only to say what the file holds
        except CheckpointDamagedError as e:
            return e
    return CheckpointDamagedError(
        f"{path} {damage.reason}: it was changed after latentdit wrote it; refused (never "
        f"loaded): restore the file, or point {folder.parent / LATEST} at an earlier checkpoint"
    )


def load_state(path: Path) -> Any:
    """`torch.load(path, weights_only=True)`; a refused pickle (or an unreadable file) is one
    CheckpointDamagedError line, never a traceback. Nothing in the file is executed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((x for x in lines if "Unsupported" in x), lines[0] if lines else "")
        what = f"holds a pickle outside the allowed types ({detail[:160]})"
    except (RuntimeError, ValueError, EOFError, OSError) as e:
        what = f"is unreadable ({str(e).strip().splitlines()[0][:160] if str(e).strip() else e!r})"
    raise CheckpointDamagedError(
        f"{path} {what}; refused (nothing in it was run): restore it from a copy, or point "
        f"{path.parent.parent / LATEST} at an earlier checkpoint"
    )
