"""The demo: every stage of latentdit, run for real on generated images, on a CPU, in minutes.

    latentdit demo --out demo_out          # or: make demo

Steps, each the real command line (shown before it runs, so the demo doubles as a tutorial):
generate the image set -> `latentdit encode` with the shipped VAE -> `latentdit validate
--decode-check` -> `latentdit train` a small DiT -> `latentdit sample` a guided grid, one row per
class -> the verdict (shipped classifier: accuracy against the class asked for, Fréchet distance
against held-out images). Everything lands in the output folder; report.json holds the figures.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from demo.config import GRID_COLUMNS, DemoConfig
from demo.data import CLASSES, SYNSET_FILE
from demo.verdict import REPORT_FILE
from latent_store import LatentditError
from sampler.outputs import make_grid, png_path, read_png, write_png

log = logging.getLogger(__name__)

PROGRAM = "latentdit"
CODE_ROOT = (
    Path(__file__).resolve().parents[1]
)  # holds cli.py, demo/, pipeline/, trainer/, sampler/


class DemoError(LatentditError):
    """A demo step failed; the message names the step and its command."""


@dataclass(frozen=True)
class Layout:
    """Where each artifact of a demo run lives."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def store(self) -> Path:
        return self.root / "store.zarr"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def grid(self) -> Path:
        return self.root / "grid.png"

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE


def latentdit_command() -> list[str]:
    """The installed `latentdit` script beside this Python, or `python -m cli` without one."""
    script = Path(sys.executable).with_name(PROGRAM)
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cli"]


def shown(cmd: list[str]) -> str:
    """The command as a person would type it: `latentdit ...` / `python -m ...`."""
    head = cmd[:1]
    if Path(cmd[0]).name == PROGRAM:
        head = [PROGRAM]
    elif cmd[0] == sys.executable:
        head = ["python"]
    return shlex.join(head + [str(c) for c in cmd[1:]])


def run_step(name: str, cmd: list[str], echo: Callable[[str], None]) -> tuple[float, str]:
    """Show and run one command; returns its seconds and its stdout (also shown).

    stderr (logs, progress bars) streams through as it comes."""
    echo(f"\n[{name}] $ {shown(cmd)}")
    t0 = time.perf_counter()
    # children import latentdit from where this process did (not another install on the path)
    path = os.pathsep.join(p for p in (str(CODE_ROOT), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [str(c) for c in cmd],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": path},
    )
    if done.stdout.strip():
        echo(done.stdout.rstrip())
    if done.returncode != 0:
        raise DemoError(f"demo step {name!r} failed with exit code {done.returncode}: {shown(cmd)}")
    return time.perf_counter() - t0, done.stdout


def commands(cfg: DemoConfig, at: Layout) -> list[tuple[str, list[str]]]:
    """The demo's command lines, in order (named steps)."""
    ld = latentdit_command()
    n_train = cfg.train_per_class * len(CLASSES)
    return [
        ("data", [*ld, "demo-tools", "data", "--out", at.data,
                  "--train-per-class", cfg.train_per_class, "--val-per-class", cfg.val_per_class,
                  "--image-size", cfg.image_size, "--seed", cfg.seed]),
        ("encode", [*ld, "encode", at.data / "train", "--out", at.store, "--vae", cfg.vae,
                    "--image-size", cfg.image_size, "--classes", at.data / SYNSET_FILE,
                    "--batch-size", 100, "--workers", 0, "--device", "cpu",
                    "--shard-size", min(1024, n_train), "--chunk-size", min(256, n_train)]),
        ("validate", [*ld, "validate", at.store, "--decode-check", cfg.decode_check, "--json"]),
        ("train", [*ld, "train", "--store", at.store, "--run", at.run, "--model", cfg.model,
                   "--hidden-size", cfg.hidden_size, "--depth", cfg.depth,
                   "--num-heads", cfg.num_heads, "--steps", cfg.train_steps,
                   "--batch-size", cfg.batch_size, "--lr", cfg.lr,
                   "--warmup-steps", cfg.warmup_steps, "--ema-decay", cfg.ema_decay,
                   "--seed", cfg.seed]),
        ("sample", [*ld, "sample", at.run, "--out", at.samples, "--vae", cfg.vae,
                    *[a for c in range(len(CLASSES)) for a in ("--class", c)],
                    "--n", cfg.samples_per_class, "--steps", cfg.sample_steps,
                    "--cfg", cfg.cfg_scale, "--seed", cfg.seed]),
    ]  # fmt: skip


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = log.info) -> dict:
    """Run every step into cfg.out; returns the report (also written to report.json)."""
    from demo.verdict import VerdictConfig, format_report, verdict

    at = Layout(cfg.out)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise DemoError(f"--out {cfg.out}: a file, not a folder; pass another --out")
    if at.report.exists() or at.store.exists():
        raise DemoError(f"{cfg.out} holds an earlier demo: remove it or pass another --out")
    seconds, stdout = {}, {}
    t0 = time.perf_counter()
    for name, cmd in commands(cfg, at):
        seconds[name], stdout[name] = run_step(name, cmd, echo)
    echo("\n[verdict] the shipped classifier names each sample; FD against held-out images;")
    echo("          Inception FID (ADM's evaluator) of samples and of the VAE floor")
    t = time.perf_counter()
    images, asked = read_samples(at.samples, cfg.samples_per_class, cfg.seed)
    write_class_grid(images, asked, at.grid)
    seconds["verdict"] = time.perf_counter() - t
    inception = None
    if cfg.fid_per_class is not None:
        from demo.inception import demo_inception

        inception = demo_inception(at.data, images, asked, vae_dir=cfg.vae,
                                   images_per_class=cfg.fid_per_class)  # fmt: skip
    seconds["inception"] = time.perf_counter() - t - seconds["verdict"]
    seconds["total"] = time.perf_counter() - t0
    extra = {
        "inception": inception,
        "decode_check": json.loads(stdout["validate"])["decode_check"],
        "seconds": seconds,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "artifacts": {k: str(getattr(at, k)) for k in ("data", "store", "run", "samples", "grid")},
    }
    report = verdict(
        VerdictConfig(data=at.data, out=cfg.out, classifier=cfg.classifier),
        images,
        asked,
        extra=extra,
    )
    echo(format_report(report))
    echo(f"\ntook {seconds['total']:.0f} s\ngrid:   {at.grid}\nreport: {at.report}")
    return report


def read_samples(folder: Path, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The sampler's PNGs of `--class 0 ... --class 9 --n per_class`: images (N, H, W, 3) uint8
    and the class each was asked for (N,); image i was asked for class i // per_class."""
    asked = np.repeat(np.arange(len(CLASSES)), per_class)
    paths = [png_path(folder, i, CLASSES[c].id, seed) for i, c in enumerate(asked)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DemoError(f"the sampler wrote no {missing[0]} ({len(missing)} images missing)")
    return np.stack([read_png(p) for p in paths]), asked


def score_samples(cfg: DemoConfig, data: Path, samples: Path) -> dict:
    """The verdict's figures of a folder sampled as the demo samples (`cfg`'s classes, count
    and seed): the shipped classifier's accuracy and feature FDs against `data`'s held-out
    images, and the Inception FIDs (samples, the VAE floor, real vs real; `demo.inception`)."""
    from demo.classifier import load_classifier
    from demo.data import load_split
    from demo.inception import demo_inception
    from demo.verdict import judge

    images, asked = read_samples(samples, cfg.samples_per_class, cfg.seed)
    real, labels = load_split(data, "val")
    judged = judge(load_classifier(cfg.classifier), images, asked, real, labels)
    fids = demo_inception(data, images, asked, vae_dir=cfg.vae, images_per_class=cfg.fid_per_class)
    return {
        "accuracy": judged["accuracy"],
        "fd_classifier": judged["fd_generated_vs_real"],
        "fd_classifier_real_vs_real": judged["fd_real_vs_real"],
        **fids,
    }


def write_class_grid(images: np.ndarray, asked: np.ndarray, path: Path) -> Path:
    """grid.png: one row per class, its first GRID_COLUMNS samples.

    make_grid tiles n images about-square; 10 classes x 10 images make 10 rows of 10."""
    rows = [images[asked == c][:GRID_COLUMNS] for c in range(len(CLASSES))]
    if any(len(r) < GRID_COLUMNS for r in rows):
        raise DemoError(f"a class grid needs {GRID_COLUMNS} samples of every class")
    write_png(path, make_grid(np.concatenate(rows)))
    return path
