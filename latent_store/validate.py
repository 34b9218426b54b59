"""Checks that catch a broken store before GPU hours are spent on it.

`validate_store` returns one `Check` per rule; the store is sound only when all pass. Each failed
check says what is wrong and where (shard, sample index, array), and what to do.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass

from latent_store.config import DEFAULT_MAX_CLIPPED
from latent_store.provenance import UNSEALED, provenance_problems
from latent_store.quantize import QMAX
from latent_store.schema import ShardRecord
from latent_store.store import LatentStore, _format_ranges, open_store
from latent_store.verify import (
    array_problems,
    check_shard,
    read_keys,
    summary_problems,
)
from latent_store.writer import summarize_records

MAX_LISTED = 5  # problems listed per check before "..."


@dataclass(frozen=True)
class Check:
    """The outcome of one rule: its name, whether it passed, and what was found."""

    name: str
    ok: bool
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def _listing(problems: list[str]) -> str:
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return "; ".join(problems[:MAX_LISTED]) + more


def _check(name: str, problems: list[str], ok_message: str) -> Check:
    return Check(name, not problems, _listing(problems) if problems else ok_message)


def check_arrays(store: LatentStore) -> Check:
    n = store.spec.num_samples
    return _check("arrays", array_problems(store), f"shapes, dtypes and chunks match ({n} samples)")


def check_provenance(store: LatentStore) -> Check:
    problems = provenance_problems(store.attrs, read_keys(store))
    if UNSEALED in problems:
        problems = [f"{UNSEALED}; seal it with `latentdit validate {store.path} --seal`"]
    return _check("provenance", problems, "metadata matches its seal (quantization, VAE, keys...)")


def check_completion(store: LatentStore, records: list[ShardRecord | None]) -> Check:
    missing = [i for i, r in enumerate(records) if r is None]
    problems = [f"no completion marker for {_format_ranges(missing)}"] if missing else []
    if missing:
        problems[0] += "; re-run the encode command to finish them"
    return _check("completion", problems, f"all {len(records)} shards complete")


def check_shards(store: LatentStore, records: list[ShardRecord | None]) -> tuple[Check, Check]:
    """Records, checksums and labels of every complete shard (one read of each shard)."""
    corrupt, bad_labels = [], []
    for shard, record in enumerate(records):
        if record is not None:
            _, problems, labels = check_shard(store, shard, record)
            corrupt, bad_labels = corrupt + problems, bad_labels + labels
    return (
        _check("checksums", corrupt, "every complete shard matches its record and checksum"),
        _check(
            "labels", bad_labels, f"labels in [0, {store.spec.num_classes}), fill only at failures"
        ),
    )


def check_summary(store: LatentStore, records: list[ShardRecord | None]) -> Check:
    return _check("summary", summary_problems(store, records), "summary matches the shard records")


def check_keys(store: LatentStore) -> Check:
    keys = store.array("keys")[:].tolist()
    problems = []
    if empty := sum(1 for k in keys if not k):
        problems.append(f"{empty} empty keys")
    if dup := [k for k, n in Counter(keys).items() if n > 1 and k]:
        problems.append(f"{len(dup)} duplicated keys, e.g. {dup[0]!r}")
    return _check("keys", problems, f"{len(keys)} keys, unique")


def check_quantization(store: LatentStore, summary: dict, max_clipped: float) -> Check:
    spec = store.spec
    problems = []
    for name, q in (("quant", spec.quant), ("logstd_quant", spec.logstd_quant)):
        if q is not None and not q.is_finite():
            problems.append(f"{name} parameters are not finite and positive: {q.to_attrs()}")
    clipped = summary["clipped_fraction"]
    if clipped > max_clipped:
        problems.append(
            f"{clipped:.2e} of values were clipped, above {max_clipped:.0e}: the calibration "
            "range is too narrow; re-encode with more calibration samples"
        )
    return _check("quantization", problems, f"parameters finite, clipped fraction {clipped:.2e}")


def check_statistics(store: LatentStore, summary: dict) -> Check:
    q = store.spec.quant
    problems = []
    for c, (mean, std) in enumerate(
        zip(summary["channel_mean"], summary["channel_std"], strict=True)
    ):
        lo, hi = q.offset[c], q.offset[c] + QMAX * q.scale[c]
        if not (math.isfinite(mean) and math.isfinite(std)):
            problems.append(f"channel {c}: statistics not finite (mean {mean}, std {std})")
        elif not lo <= mean <= hi:
            problems.append(
                f"channel {c}: mean {mean:.4g} outside the quantized range [{lo:.4g}, {hi:.4g}]"
            )
        elif std < q.scale[c]:
            problems.append(
                f"channel {c}: std {std:.3g} below one quantization step {q.scale[c]:.3g} "
                "(constant latents: was the VAE or the input broken?)"
            )
    return _check("statistics", problems, "per-channel mean and std plausible")


def validate_store(
    path: str | os.PathLike | LatentStore, *, max_clipped: float = DEFAULT_MAX_CLIPPED
) -> list[Check]:
    """Run every check on a store (a path, URL or open store, see `open_store`).

    Opening errors (no store, unknown format) raise instead.
    """
    store = open_store(path)
    checks = [check_arrays(store), check_provenance(store)]
    if not checks[0].ok:  # reading shards through wrong shapes would only add noise
        return checks
    records = store.records()
    summary = summarize_records(store, records)
    checks += [check_completion(store, records), *check_shards(store, records), check_keys(store)]
    checks.append(check_summary(store, records))
    checks += [check_quantization(store, summary, max_clipped), check_statistics(store, summary)]
    return checks
