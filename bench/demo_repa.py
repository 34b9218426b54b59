"""REPA on the demo, side by side: the demo's DiT with and without `--repa-coeff`.

    python bench/demo_repa.py --out /tmp/demo_repa --steps 2000 --seeds 0 1   # ~35 min, 2-core VM

One image set and one store (`latentdit encode ... --features demo/assets/encoder`: the demo's own
image encoder, never the verdict classifier), then for each training seed four runs of the demo's
DiT with the demo's options: plain and REPA at `--steps`, plain and REPA at half of them. Each run
is sampled as the demo samples (its classes, per-class count, solver, guidance; sampling seed 0
for every run, so runs differ only by their training) and judged as the demo's verdict judges:
the shipped classifier's accuracy against the class asked for and its feature FD against held-out
half A (beside FD(B, A) of two real halves), and the Inception FID against the VAE's floor (the
FID of the VAE's own reconstructions of held-out images). One JSON line per run on stdout and in
OUT/results.jsonl; a table of the per-seed means at the end.

REPA's options here: `--repa-depth 2` (REPA aligns block 8 of SiT-XL's 28 and block 4 of the
12-block B models, about a third of the depth: block 2 of the demo's 4 is the nearest) and
`--repa-projector-dim 256` (REPA's 2048 would be a projector 6x the size of the whole demo DiT;
its MLP shape and loss are unchanged), `--repa-coeff 0.5` (REPA's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

from demo import ENCODER_DIR
from demo.config import DemoConfig
from demo.run import Layout, commands, run_step, score_samples

REPA = ["--repa-coeff", "0.5", "--repa-depth", "2", "--repa-projector-dim", "256"]


def _swap(cmd: list, was: Path, now: Path) -> list:
    """`cmd` with the path `was` replaced by `now` (the demo's commands name its own layout)."""
    return [now if c == was else c for c in cmd]


def prepare(cfg: DemoConfig, at: Layout) -> dict:
    """Generate the demo's images and encode them with the demo encoder's features."""
    steps = dict(commands(cfg, at))
    seconds = {"data": run_step("data", steps["data"], print)[0]}
    encode = [*steps["encode"], "--features", ENCODER_DIR]
    seconds["encode"] = run_step("encode --features", encode, print)[0]
    return seconds


def final_terms(run_dir: Path) -> dict:
    """The loss terms averaged over the last tenth of the run's logged steps (the log's own
    names: loss_mse, and loss_proj, REPA's negative cosine similarity, with REPA)."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss_mse" in r]
    tail = steps[-max(1, len(steps) // 10) :]
    names = sorted({k for r in tail for k in r if k.startswith("loss_")})
    return {k: statistics.mean(r[k] for r in tail if k in r) for k in names}


def one_run(cfg: DemoConfig, at: Layout, name: str, seed: int, steps: int, repa: bool) -> dict:
    """Train one DiT (the demo's options, `seed`, `steps`, REPA or not), sample it, judge it."""
    run_dir, samples = at.root / "runs" / name, at.root / "samples" / name
    trained = commands(replace(cfg, seed=seed, train_steps=steps), at)
    train = _swap(dict(trained)["train"], at.run, run_dir) + (REPA if repa else [])
    t_train = run_step(f"train {name}", train, print)[0]
    sample = _swap(_swap(dict(commands(cfg, at))["sample"], at.run, run_dir), at.samples, samples)
    t_sample = run_step(f"sample {name}", [*sample, "--no-grid"], print)[0]
    t0 = time.perf_counter()
    scored = score_samples(cfg, at.data, samples)
    return {
        "run": name,
        "repa": repa,
        "seed": seed,
        "steps": steps,
        **{k: scored[k] for k in ("accuracy", "fd_classifier", "fd_classifier_real_vs_real")},
        "fid_inception": scored["fid_generated"],
        "fid_vae_floor": scored["fid_reconstruction"],
        "fid_real_vs_real": scored["fid_real_vs_real"],
        "images_per_fid_set": scored["images_per_set"],
        "final_loss_terms": final_terms(run_dir),
        "seconds": {
            "train": round(t_train, 1),
            "sample": round(t_sample, 1),
            "judge": round(time.perf_counter() - t0, 1),
        },
    }


def table(rows: list[dict]) -> str:
    """Markdown: per (REPA, steps), the mean and the per-seed values of each figure."""
    lines = [
        "| run | steps | seeds | named right | FD (classifier) | Inception FID | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["repa"], r["steps"]), []).append(r)
    for (repa, steps), rs in sorted(groups.items(), key=lambda g: (-g[0][1], g[0][0])):

        def cell(key: str, fmt: str, rs=rs) -> str:
            values = [r[key] for r in rs]
            each = " / ".join(format(v, fmt) for v in values)
            return f"{format(statistics.mean(values), fmt)} ({each})"

        train_s = statistics.mean(r["seconds"]["train"] for r in rs)
        lines.append(
            f"| {'REPA' if repa else 'plain'} | {steps} | {len(rs)} | {cell('accuracy', '.3f')} "
            f"| {cell('fd_classifier', '.2f')} | {cell('fid_inception', '.1f')} | {train_s:.0f} |"
        )
    floor = rows[0]
    lines.append(
        f"\nVAE floor (Inception FID of reconstructions) {floor['fid_vae_floor']:.1f}; "
        f"real vs real {floor['fid_real_vs_real']:.1f}; classifier FD real vs real "
        f"{floor['fd_classifier_real_vs_real']:.2f}"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="a new folder for everything")
    p.add_argument("--steps", type=int, default=DemoConfig.train_steps, help="the full length")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    args = p.parse_args()
    if args.out.exists():
        p.error(f"--out {args.out} exists: give a new folder")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # see docs/demo.md: 2 threads were slower
    cfg, at = DemoConfig(out=args.out), Layout(args.out)
    t0 = time.perf_counter()
    prepared = prepare(cfg, at)
    rows = []
    with open(args.out / "results.jsonl", "a") as results:
        for seed in args.seeds:
            for repa in (False, True):
                for steps in (args.steps, args.steps // 2):
                    name = f"{'repa' if repa else 'plain'}-{steps}-seed{seed}"
                    rows.append(one_run(cfg, at, name, seed, steps, repa))
                    print(json.dumps(rows[-1]), flush=True)
                    results.write(json.dumps(rows[-1]) + "\n")
                    results.flush()
    summary = {"prepare_seconds": prepared, "total_seconds": round(time.perf_counter() - t0)}
    print(json.dumps(summary))
    print(table(rows))


if __name__ == "__main__":
    main()
