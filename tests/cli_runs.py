"""The CLI as a user runs it, for the fault tests: its exit code, its output, its one error line.

done = run_cli("train", "--run", str(run), "--steps", "6")   # a real process
done = run_cli(..., real=False)  # the same command line in this process (quicker): stderr
                                 # then holds the log records too
line = error_line(done)          # exactly one `error:` line, no traceback anywhere
before = digests(run)            # blake2b of every file, to compare after a refusal
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def digests(folder: str | os.PathLike, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{path under folder: blake2b} of every file, except names in `skip`."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 600, cwd: Path = ROOT, real: bool = True
) -> subprocess.CompletedProcess:
    """`latentdit ARGS...` in a new process (cli.py of this checkout), output captured as text;
    `env` is added to this process's environment (None values: removed). With `real=False`
    through Typer's runner in this process (`env` is not applied then)."""
    if not real:
        return _invoke(list(map(str, args)))
    merged = {**os.environ, **ENV, **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *map(str, args)],
        cwd=cwd,
        env={k: v for k, v in merged.items() if v is not None},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _invoke(args: list[str]) -> subprocess.CompletedProcess:
    from typer.testing import CliRunner

    from cli import app

    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        root.removeHandler(handler)
    crash = result.exception if not isinstance(result.exception, (SystemExit, type(None))) else None
    trace = "".join(traceback.format_exception(crash)) if crash else ""
    return subprocess.CompletedProcess(
        ["latentdit", *args],
        result.exit_code,
        result.stdout,
        logs.getvalue() + result.stderr + trace,
    )


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one `error:` line a refused command printed (asserted: exit 2, no traceback)."""
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, (done.returncode, output[-3000:])
    return errors[0]
