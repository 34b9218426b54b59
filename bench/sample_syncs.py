"""Where `latentdit sample` makes the host wait for the GPU: CUDA sync points by source line.

    python bench/sample_syncs.py RUN --out /tmp/syncs --json syncs.json [--cfg-interval 0 0.6]

Runs the real `sampler.sample.sample` on a checkpoint (a tiny one from `testkit.make_checkpoint`
does) twice, without and with a guidance interval, under `torch.cuda.set_sync_debug_mode("warn")`,
and counts the synchronizing CUDA calls by the innermost line of this repository that made them.
The claim it checks: between the decoder of batch k and the first model call of batch k + 1
nothing waits for the GPU, and without a guidance interval a solve reads nothing back (with one:
one flag per model call, `sampler/guidance.py`). Loading the checkpoint and the final `.npz` may
sync; they happen once. Without CUDA it runs on the CPU and reports `"cuda": false`. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import threading
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

from sampler.config import SampleConfig, SolveConfig
from sampler.sample import sample

ROOT = Path(__file__).resolve().parents[1]


def repo_site(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame of this repository's code (not the venv, not this script)."""
    for frame in reversed(stack):
        path = Path(frame.filename).resolve()
        if (
            path.is_relative_to(ROOT)
            and ".venv" not in path.parts
            and path != Path(__file__).resolve()
        ):
            return f"{path.relative_to(ROOT)}:{frame.lineno} {frame.name}"
    return "outside the repository"


def count_syncs(args, interval: tuple[float, float] | None, out: Path, cuda: bool) -> dict:
    """Run `sample` once under the sync debug mode; its sync points by site."""
    sites: Counter[str] = Counter()
    lock = threading.Lock()

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            with lock:
                sites[repo_site(traceback.extract_stack()[:-1])] += 1

    cfg = SampleConfig(
        checkpoint=args.run, out=str(out), classes=("0",), n=args.n, batch_size=args.batch_size,
        npz=True, solve=SolveConfig(steps=args.steps, cfg=2.0, cfg_interval=interval),
        device="cuda" if cuda else "cpu",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            result = sample(cfg)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    return {
        "cfg_interval": list(interval) if interval else None,
        "images": result.made,
        "syncs": sum(sites.values()),
        "by_site": dict(sites.most_common()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--out", required=True, help="a folder for the runs' images")
    p.add_argument("--json", default=None)
    p.add_argument("--n", type=int, default=12, help="images (of class 0)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 0.6), help="second run's")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    report = {
        "bench": "sample_syncs",
        "cuda": cuda,
        "batches": -(-args.n // args.batch_size),
        "model_calls_per_batch": 2 * args.steps,  # the default flow solver, heun: 2 per step
        "runs": [
            count_syncs(args, None, Path(args.out) / "no_interval", cuda),
            count_syncs(args, tuple(args.cfg_interval), Path(args.out) / "interval", cuda),
        ],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
