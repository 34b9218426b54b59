"""The demo's guidance sweep: accuracy and Inception FID of its samples at several guidance scales.

    python bench/demo_guidance_sweep.py demo_out --cfg 1.0 1.5 2.0 3.0    # after `latentdit demo`

For each scale it samples the finished demo run exactly as the demo does (its classes, per-class
count, steps and seed), then judges the images as the demo's verdict does: the shipped classifier's
accuracy, its feature FD, and the Inception FID (ADM's evaluator) against held-out half A with
same-sized sets. Prints one JSON line per scale.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from demo.config import DemoConfig
from demo.data import CLASSES
from demo.run import Layout, latentdit_command, score_samples


def sweep_point(at: Layout, cfg: DemoConfig, scale: float, work: Path) -> dict:
    out = work / f"cfg-{scale:g}"
    cmd = [*latentdit_command(), "sample", str(at.run), "--out", str(out), "--vae", str(cfg.vae),
           *[a for c in range(len(CLASSES)) for a in ("--class", str(c))],
           "--n", str(cfg.samples_per_class), "--steps", str(cfg.sample_steps),
           "--cfg", str(scale), "--seed", str(cfg.seed), "--no-grid"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return {
        "cfg": scale,
        **score_samples(cfg, at.data, out),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("demo_out", type=Path, help="a finished `latentdit demo --out` folder")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    args = p.parse_args()
    at, cfg = Layout(args.demo_out), DemoConfig(out=args.demo_out)
    work = args.demo_out / "sweep"
    for scale in args.cfg:
        print(json.dumps(sweep_point(at, cfg, scale, work)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
