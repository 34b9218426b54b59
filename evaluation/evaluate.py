"""`latentdit evaluate`: FID, sFID, IS, precision/recall as ADM computes them; FD_DINOv2 as EDM2.

    latentdit evaluate samples_50000x256x256x3.npz --ref VIRTUAL_imagenet256_labeled.npz
    latentdit evaluate val_images/ --save-stats val_stats.npz     # featurize a reference once
    latentdit evaluate samples/ --ref val_stats.npz --metrics fid,fd_dinov2 --json

SAMPLES and REF may each be any input of `evaluation.inputs`. Both are opened and checked
(headers and sizes, statistics, the networks a stats file was made with) before any image is
featurized; each image is decoded once and goes through every network the metrics need
(`evaluation.spaces`). Without --ref only the Inception Score is computed; a metric the inputs or
the network cannot give is null, with its reason. The result says how the samples were made (their
`sample.json`) and which reference was used (its SHA-256; ADM's reference batch by name).

    torchrun --standalone --nproc_per_node=8 cli.py -- evaluate samples.npz --ref ref.npz --json

Under torchrun each rank featurizes its share of every image set (`evaluation.features.featurize`);
rank 0 checks the files' CRC-32 beside it, computes the statistics and the metrics and writes
--save-stats; every rank returns the same result.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.config import EvaluateConfig
from evaluation.errors import EvaluationError
from evaluation.inputs import LEGACY_NETWORK_KEY, NETWORKS_KEY, ImageSet, StatsFile
from evaluation.scoring import SetStats, compare, set_stats
from evaluation.spaces import INCEPTION, METRICS, SPACES, spaces_of

log = logging.getLogger(__name__)

NETWORK_OPTIONS = {INCEPTION: "--inception", "dinov2": "--dinov2"}


def load_networks(cfg: EvaluateConfig, spaces: tuple[str, ...], device: str) -> dict[str, Any]:
    """The feature network of each space, loaded once."""
    nets: dict[str, Any] = {}
    if INCEPTION in spaces:
        from evaluation.network import load_inception

        nets[INCEPTION] = load_inception(cfg.inception, device=device)
    if "dinov2" in spaces:
        from evaluation.dinov2 import load_dinov2

        nets["dinov2"] = load_dinov2(cfg.dinov2, device=device)
    return nets


def check_spaces(opened: StatsFile, metrics: tuple[str, ...]) -> None:
    """Refuse a stats file lacking the statistics of a space the metrics need."""
    for space in spaces_of(metrics):
        if space not in opened.spaces():
            asked = ",".join(m for m in metrics if METRICS[m].space == space)
            keys = ", ".join(k for g in SPACES[space].gaussians for k in (g.mu, g.sigma))
            raise EvaluationError(
                f"{opened.path}: no {space} statistics ({keys}) for --metrics {asked}; remake it "
                f"with `latentdit evaluate IMAGES --metrics {asked} --save-stats FILE`, or leave "
                f"{asked} out"
            )


def check_networks(opened: StatsFile, metrics: tuple[str, ...], nets: dict[str, Any]) -> None:
    """Refuse a stats file whose features of a needed space come from another network."""
    for space in spaces_of(metrics):
        recorded = opened.networks.get(space, {}).get("fingerprint")
        ours = nets[space].identity["fingerprint"]
        if recorded not in (None, ours):
            raise EvaluationError(
                f"{opened.path}: its {space} features come from network {recorded}, this run "
                f"uses {ours}; recompute the stats with this network or pass its "
                f"{NETWORK_OPTIONS[space]}"
            )


def open_inputs(cfg: EvaluateConfig, device: str) -> list[ImageSet | StatsFile]:
    """SAMPLES (and REF) opened and checked, before any network is loaded or image featurized."""
    from evaluation.inputs import DecodeLimits, open_input

    paths = [cfg.samples] + ([cfg.ref] if cfg.ref is not None else [])
    decode = DecodeLimits(max_pixels=cfg.max_pixels, max_file_mb=cfg.max_file_mb)
    opened = [
        open_input(
            p,
            limit=cfg.limit,
            workers=cfg.workers,
            vae=cfg.vae,
            device=device,
            storage_options=cfg.store_options,
            decode=decode,
        )
        for p in paths
    ]
    for o in opened:
        if isinstance(o, ImageSet) and o.count < 2:
            raise EvaluationError(f"{o.path}: {o.count} image(s); statistics need at least 2")
        if isinstance(o, StatsFile):
            check_spaces(o, cfg.metric_names)
    return opened


class Background:
    """fn() run in a daemon thread; `result()` waits for it and returns or raises what it did."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.out, self.error = fn, None, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.out = self.fn()
        except BaseException as e:  # handed to result()
            self.error = e

    def result(self) -> Any:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.out


def summarize(
    opened: ImageSet | StatsFile, cfg: EvaluateConfig, nets: dict[str, Any], device: str
) -> SetStats | None:
    """Featurize an opened input (if it has images) and compute its statistics.

    Every rank must call it (each featurizes its share); the statistics are on rank 0, None on
    the other ranks. Rank 0 checks the input's integrity (e.g. an .npz member's CRC-32) in a
    thread beside the featurizing; damage is raised on every rank.
    """
    from evaluation.features import featurize
    from foundation.distributed import on_main, rank_and_world

    if isinstance(opened, StatsFile):
        return SetStats(
            "stats", str(opened.path), opened.count, opened.stats, opened.features, opened.networks
        )
    checked = Background(opened.verify) if opened.verify and rank_and_world()[0] == 0 else None
    f = featurize(opened, list(nets.values()), batch_size=cfg.batch_size, device=device)
    warning = on_main(lambda: checked.result() if checked else None)
    if f is None:  # another rank than 0
        return None
    s = set_stats(opened.kind, opened.path, f, nets)
    s.skipped = opened.skipped + opened.count - s.count  # listed, then failed to decode
    if s.skipped:
        log.warning("%s: %d image files skipped (see the warnings above)", opened.path, s.skipped)
    s.stats.update(opened.stats)  # a reference batch's own statistics win, as in ADM
    s.warnings += [warning] if warning else []
    return s


def save_stats(s: SetStats, out: Path) -> Path:
    """The statistics and features of every space (ADM's key names for Inception) and the
    networks' identities, written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.npz")
    extra = {NETWORKS_KEY: np.array(json.dumps(s.networks))}
    if INCEPTION in s.networks:  # what stats files held before there were several spaces
        extra[LEGACY_NETWORK_KEY] = np.array(s.networks[INCEPTION]["sha1"])
    np.savez(tmp, **s.stats, **s.features, **extra)
    os.replace(tmp, out)
    return out


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score cfg.samples (against cfg.ref); write --save-stats; return the result record.

    Under torchrun (or inside a process group) every rank featurizes its share of each set and
    returns the same record; rank 0 alone writes --save-stats.
    """
    from foundation.distributed import on_main, process_group

    with process_group(cfg.device) as info:
        device = str(info.device)
        opened = open_inputs(cfg, device)
        nets = load_networks(cfg, spaces_of(cfg.metric_names), device)
        for o in opened:
            if isinstance(o, StatsFile):
                check_networks(o, cfg.metric_names, nets)
        samples, *ref = [summarize(o, cfg, nets, device) for o in opened]
        return on_main(
            lambda: _score(
                cfg, samples, ref[0] if ref else None, nets, device, ranks=info.world_size
            )
        )


def _score(
    cfg: EvaluateConfig,
    samples: SetStats,
    ref: SetStats | None,
    nets: dict[str, Any],
    device: str,
    ranks: int,
) -> dict[str, Any]:
    """The result record of `evaluate` from both sets' statistics (on rank 0)."""
    from evaluation.provenance import reference_identity, sample_settings

    if cfg.save_stats is not None:
        save_stats(samples, Path(cfg.save_stats))
    values, reasons, warnings = compare(samples, ref, nets, cfg.metric_names, device)
    warnings = [*samples.warnings, *(ref.warnings if ref else []), *warnings]
    for w in warnings:
        log.warning(w)

    def describe(s: SetStats) -> dict:
        shown = ("kind", "path", "count", "images_per_s", "skipped")
        return {k: getattr(s, k) for k in shown}

    inception = nets.get(INCEPTION)
    return {
        **values,
        "metrics": list(cfg.metric_names),
        "null_reasons": reasons,
        "samples": {**describe(samples), "settings": sample_settings(Path(cfg.samples))},
        "ref": None if ref is None else {**describe(ref), "identity": reference_identity(cfg.ref)},
        "network": None if inception is None else {"name": inception.name, "sha1": inception.sha1},
        "networks": {space: net.identity for space, net in nets.items()},
        "ranks": ranks,
        "warnings": warnings,
        "save_stats": None if cfg.save_stats is None else str(cfg.save_stats),
    }


def format_result(r: dict[str, Any]) -> str:
    """The human-readable table of an `evaluate` result."""
    lines = []
    for role in ("samples", "ref"):
        if r[role] is not None:
            s = r[role]
            count = "" if s["count"] is None else f", {s['count']} images"
            count += f", {s['skipped']} files skipped" if s.get("skipped") else ""
            lines.append(f"{role:<16} {s['path']} ({s['kind']}{count})")
    if r["ref"] is not None and r["ref"]["identity"]["sha256"]:
        ident = r["ref"]["identity"]
        lines.append(
            f"{'ref sha256':<16} {ident['sha256']}"
            + (f" = {ident['known_as']}" if ident["known_as"] else "")
        )
    settings = r["samples"]["settings"]
    if settings:
        g = settings["guidance"]
        lines.append(
            f"{'sampled':<16} step {settings['step']} ({'EMA' if settings['ema'] else 'raw'}), "
            f"{settings['solver']} {settings['steps']} steps / {settings['model_calls']} calls, "
            f"cfg {g['scale']} on {g['channels']} channels, interval {g['interval']}, labels "
            f"{settings['label_sampling']}, {settings['precision']}, seed {settings['seed']}"
        )
    for space, net in r["networks"].items():
        lines.append(f"{space:<16} {net['name']} ({net['fingerprint'][:12]})")
    for name in r["metrics"]:
        for key, label in METRICS[name].results.items():
            value = r[key]
            shown = f"{value:.4f}" if value is not None else f"-  ({r['null_reasons'][key]})"
            lines.append(f"{label:<16} {shown}")
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)
