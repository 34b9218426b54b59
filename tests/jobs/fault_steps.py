"""Run CLI steps against a folder that may be a small tmpfs, and report what each step left.

    python tests/jobs/fault_steps.py SPEC.json RESULT.json

SPEC: {"dir": D, "steps": [...], "copy_out": FOLDER or null}; each step is one of
    {"cli": [args...], "inject": {"when": PATTERN, "action": "fill"|"fail"|"kill"} or absent}
    {"free": true}          # delete the filler: the disk has room again
RESULT: one entry per step: {"rc", "stderr" (its end), "files": {path under D: blake2b}}.
`tests/test_faults_disk.py` runs it directly, or inside `unshare` with D a fresh tmpfs (whose
files only this process tree sees: hence the report, and `copy_out` of D at the end).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILLER = ".filler"


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != FILLER
    }


def run_step(folder: Path, step: dict) -> dict:
    if step.get("free"):
        (folder / FILLER).unlink(missing_ok=True)
        return {"rc": 0, "stderr": "", "files": snapshot(folder)}
    inject = step.get("inject")
    command = [sys.executable, str(ROOT / "tests/jobs/disk_full.py"), "--dir", str(folder)]
    if inject:
        command += ["--when", inject["when"], "--action", inject["action"]]
    else:
        command += ["--when", "/nothing/matches/this", "--action", "fail"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*command, "--", *step["cli"]], cwd=ROOT, env=env, capture_output=True, text=True
    )
    return {"rc": done.returncode, "stderr": done.stderr[-4000:], "files": snapshot(folder)}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    folder = Path(spec["dir"])
    results = [run_step(folder, step) for step in spec["steps"]]
    if spec.get("copy_out"):
        shutil.copytree(folder, spec["copy_out"], ignore=shutil.ignore_patterns(FILLER))
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
