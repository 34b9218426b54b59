"""Checks that catch a broken store before GPU hours are spent on it.

`validate_store` returns one `Check` per rule; the store is sound only when all pass. Each failed
check says what is wrong and where (shard, sample index, array), and what to do.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass

from latent_store.arrays import ArraySpec
from latent_store.attached import attached_problems
from latent_store.config import DEFAULT_MAX_CLIPPED
from latent_store.errors import LatentditError
from latent_store.finalize import ARRAYS_KEY, shard_stats_rows, summarize_records, summarized_arrays
from latent_store.provenance import UNSEALED, provenance_problems
from latent_store.quantize import QMAX
from latent_store.schema import ShardRecord
from latent_store.stats import combine
from latent_store.store import LatentStore, _format_ranges, open_store
from latent_store.verify import (
    array_problems,
    check_shard,
    read_keys,
    summary_problems,
)

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
    """Every declared array's layout, and the attachments the declarations name."""
    n = store.spec.num_samples
    problems = array_problems(store)
    problems += [] if problems else attached_problems(store)
    return _check("arrays", problems, f"shapes, dtypes and chunks match ({n} samples)")


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
    """Records, checksums and labels of every complete shard (one read of each shard), of every
    array: those made with the store, and each added one where its shard is written."""
    corrupt, bad_labels = [], []
    added = {a.name: store.records(a.name) for a in store.spec.added_arrays}
    for shard, record in enumerate(records):
        if record is not None:
            names = [*store.spec.base_names, *(n for n, r in added.items() if r[shard])]
            mine = {n: r[shard] for n, r in added.items()}
            _, problems, labels = check_shard(store, shard, record, names=names, added=mine)
            corrupt, bad_labels = corrupt + problems, bad_labels + labels
    for name, recs in added.items():
        if missing := [i for i, r in enumerate(recs) if r is None and records[i] is not None]:
            corrupt.append(
                f"array {name!r} is not written for {_format_ranges(missing)}; re-run the "
                "command that adds it"
            )
    return (
        _check("checksums", corrupt, "every complete shard matches its record and checksum"),
        _check(
            "labels", bad_labels, f"labels in [0, {store.spec.num_classes}), fill only at failures"
        ),
    )


def check_summary(
    store: LatentStore, records: list[ShardRecord | None], fresh: dict, stats_problems: list[str]
) -> Check:
    """The stored summary against the records and the statistics rows it names (what readers
    check), and against `fresh`, the summary made anew from every shard's statistics row."""
    problems = summary_problems(store, records) + stats_problems
    stored = store.summary
    if stored is not None and not problems and all(r is not None for r in records):
        named = stored.get(ARRAYS_KEY) or {}
        for name, section in (fresh.get(ARRAYS_KEY) or {}).items():
            if name not in named:
                problems.append(f"array {name!r} is written but not summarized; finalize the store")
            elif section != named[name]:
                problems.append(f"the store's statistics of {name!r} are not its shards' combined")
    return _check("summary", problems, "summary matches the shard records and statistics")


def fresh_rows(store: LatentStore) -> tuple[dict, list[str]]:
    """The statistics rows of every summarized array, combined anew from its shards' rows (each
    checked against its record), and the problems met."""
    rows, problems = {}, []
    for name in summarized_arrays(store):
        try:
            parts = shard_stats_rows(store, name, store.records(name))
        except LatentditError as e:
            problems.append(str(e).removeprefix(f"{store.path}: ").split("; run")[0])
            continue
        if any(count for count, _ in parts):
            rows[name] = combine(parts)[0]
    return rows, problems


def check_keys(store: LatentStore) -> Check:
    keys = store.array("keys")[:].tolist()
    problems = []
    if empty := sum(1 for k in keys if not k):
        problems.append(f"{empty} empty keys")
    if dup := [k for k, n in Counter(keys).items() if n > 1 and k]:
        problems.append(f"{len(dup)} duplicated keys, e.g. {dup[0]!r}")
    return _check("keys", problems, f"{len(keys)} keys, unique")


def _array_summaries(store: LatentStore, summary: dict) -> dict[str, dict]:
    """name -> the summary's clipped fraction and statistics of each array that has them."""
    sections = dict(summary.get(ARRAYS_KEY) or {})
    if store.spec.format_version == 1:  # the latents' are at the top
        sections["latents"] = summary
    return sections


def check_quantization(store: LatentStore, summary: dict, max_clipped: float) -> Check:
    """Per quantized array: finite parameters, the clipped fraction, and the error that rounding
    adds (rms step / sqrt(12), as a share of each channel's std: reported, never failed)."""
    problems, notes = [], []
    sections = _array_summaries(store, summary)
    for array in store.spec.arrays:
        q, section = array.quant, sections.get(array.name, {})
        if q is None:  # stored as is: only what its writer measured (e.g. float16 rounding)
            notes += [f"{array.name}: {array.dtype}{_measured(array)}"] if _measured(array) else []
            continue
        if not q.is_finite():
            problems.append(f"{array.name}: parameters are not finite and positive")
        clipped = section.get("clipped_fraction")
        if clipped is not None and clipped > max_clipped:
            problems.append(
                f"{array.name}: {clipped:.2e} of values were clipped, above {max_clipped:.0e}: "
                "the calibration range is too narrow; re-encode with more calibration samples"
            )
        notes.append(
            f"{array.name}: clipped {_fraction(clipped)}{_error(q, section)}{_measured(array)}"
        )
    return _check("quantization", problems, "; ".join(notes))


def _fraction(value: float | None) -> str:
    return "not summarized" if value is None else f"{value:.2e}"


def _error(q, section: dict) -> str:
    """', error 0.9% of std (worst channel 2: 1.4%)': rounding's rms error against the std."""
    stds = section.get("channel_std")
    if not stds or not all(math.isfinite(s) and s > 0 for s in stds):
        return ""
    shares = [scale / math.sqrt(12) / std for scale, std in zip(q.scale, stds, strict=True)]
    worst = max(range(len(shares)), key=shares.__getitem__)
    mean = sum(shares) / len(shares)
    return f", error {mean:.1%} of std (worst channel {worst}: {shares[worst]:.1%})"


def _measured(array: ArraySpec) -> str:
    """'; measured when written: rms 0.8% of the values' rms, cosine 0.99997' from the
    declaration's made_by["quantization_error"], when the writer measured it."""
    measured = (array.made_by or {}).get("quantization_error") or {}
    parts = []
    if isinstance(measured.get("relative_rms"), int | float):
        parts.append(f"rms {measured['relative_rms']:.2%} of the values' rms")
    if isinstance(measured.get("cosine"), int | float):
        parts.append(f"cosine {measured['cosine']:.5f}")
    return f"; measured when written: {', '.join(parts)}" if parts else ""


def check_statistics(store: LatentStore, summary: dict) -> Check:
    """Per array with statistics: finite, each channel's mean inside its quantized range, and its
    std at least one quantization step (constant values mean a broken encoder or input)."""
    problems = []
    for name, section in _array_summaries(store, summary).items():
        if name in store.spec.names and "channel_mean" in section:
            problems += _channel_problems(store.spec.array(name), section)
    return _check("statistics", problems, "per-channel mean and std plausible")


def _channel_problems(array: ArraySpec, section: dict) -> list[str]:
    problems, q = [], array.quant
    prefix = "" if array.name == "latents" else f"{array.name}: "
    pairs = zip(section["channel_mean"], section["channel_std"], strict=True)
    for c, (mean, std) in enumerate(pairs):
        if mean is None or std is None or not (math.isfinite(mean) and math.isfinite(std)):
            problems.append(f"{prefix}channel {c}: statistics not finite (mean {mean}, std {std})")
        elif q is None:
            continue
        elif not q.offset[c] <= mean <= q.offset[c] + QMAX * q.scale[c]:
            lo, hi = q.offset[c], q.offset[c] + QMAX * q.scale[c]
            problems.append(
                f"{prefix}channel {c}: mean {mean:.4g} outside the quantized range "
                f"[{lo:.4g}, {hi:.4g}]"
            )
        elif std < q.scale[c]:
            problems.append(
                f"{prefix}channel {c}: std {std:.3g} below one quantization step "
                f"{q.scale[c]:.3g} (constant latents: was the VAE or the input broken?)"
            )
    return problems


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
    rows, stats_problems = fresh_rows(store)
    summary = summarize_records(store, records, rows)
    checks += [check_completion(store, records), *check_shards(store, records), check_keys(store)]
    checks.append(check_summary(store, records, summary, stats_problems))
    checks += [check_quantization(store, summary, max_clipped), check_statistics(store, summary)]
    return checks
