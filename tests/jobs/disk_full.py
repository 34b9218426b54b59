"""Run the latentdit CLI with a disk that fills up at a chosen moment, for the fault tests.

    python tests/jobs/disk_full.py --dir D --when '*/checkpoints/.tmp-*/state.pt' --action fill \
        -- train --run D/run --steps 4

The moment is the first time a file whose absolute path matches `--when` (fnmatch) is opened for
writing. Then, by `--action`:
- fill: write D/.filler until the device is full: every later write on it fails with the
  kernel's own ENOSPC (use it with D on a small tmpfs; deleting the filler frees the space);
- fail: a simulation for where no tmpfs can be mounted: every later opening for writing under D
  (open, io.open, os.open) raises ENOSPC, as a full disk does;
- kill: SIGKILL this process (what a crash or a scheduler's kill does at that instant).
Writers that bypass Python's file objects (safetensors' save_file, torch.save to a path) are
seen by `fill` only: a simulated trigger must name a file written through Python (state.pt,
the store's chunks, the sampler's parts and .npz).
"""

from __future__ import annotations

import argparse
import builtins
import errno
import fnmatch
import io
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

FILLER = ".filler"
BLOCK = 1 << 20
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


class Injector:
    """Watches openings for writing; at the trigger, fills the disk, fails writes or kills."""

    def __init__(self, folder: Path, when: str, action: str) -> None:
        self.folder, self.when, self.action = str(folder.resolve()), when, action
        self.fired = False
        self.open, self.io_open, self.os_open = builtins.open, io.open, os.open

    def install(self) -> None:
        builtins.open = self._wrap(self.open)
        io.open = self._wrap(self.io_open)
        os.open = self._os_open

    def _check(self, path, writing: bool) -> None:
        if not writing:
            return
        try:
            full = os.path.abspath(os.fsdecode(path))
        except TypeError:  # a file descriptor
            return
        if not self.fired and fnmatch.fnmatch(full, self.when):
            self.fired = True
            if self.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.action == "fill":
                self._fill()
        if self.fired and self.action == "fail" and full.startswith(self.folder + os.sep):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), full)

    def _fill(self) -> None:
        """Write the filler until the device is full (then smaller blocks, to the last byte)."""
        fd = self.os_open(os.path.join(self.folder, FILLER), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for size in (BLOCK, 4096, 1):
                chunk = b"\0" * size
                try:
                    while os.write(fd, chunk) == size:
                        pass
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
        finally:
            os.close(fd)

    def _wrap(self, real):
        def opener(file, mode="r", *args, **kwargs):
            self._check(file, any(c in mode for c in "wax+"))
            return real(file, mode, *args, **kwargs)

        return opener

    def _os_open(self, path, flags, *args, **kwargs):
        self._check(path, bool(flags & _WRITE_FLAGS))
        return self.os_open(path, flags, *args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="the disk (a folder) that fills")
    parser.add_argument("--when", required=True, help="fnmatch pattern of the trigger's path")
    parser.add_argument("--action", choices=("fill", "fail", "kill"), required=True)
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- and the latentdit arguments")
    args = parser.parse_args()
    cli_args = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    Injector(args.dir, args.when, args.action).install()
    sys.argv = ["latentdit", *cli_args]
    from cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
