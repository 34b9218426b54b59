"""Describe a store for `latentdit inspect`: counts, classes, size, provenance, completion, and
each declared array (shape, dtype, quantization, statistics)."""

from __future__ import annotations

import os
from dataclasses import asdict

import numpy as np

from latent_store.finalize import ARRAYS_KEY, summarize_records, summary_rows
from latent_store.schema import LABEL_FILL
from latent_store.store import LatentStore, _format_ranges, open_store
from latent_store.verify import verify_labels, verify_store

FAILURES_SHOWN = 10


def _bytes_on_disk(store: LatentStore) -> int:
    if store.local_root is None:
        return store.nbytes()  # every object's size, listed through the store
    return sum(f.stat().st_size for f in store.local_root.rglob("*") if f.is_file())


def describe_store(path: str | os.PathLike | LatentStore, *, verify: bool = True) -> dict:
    """A JSON-ready description of a store (a path, URL or open store, see `open_store`).

    With `verify`, the store's seal and summary are checked and the labels it counts checked
    against the shard records (StoreCorruptError names the first problem); the latents are not
    read: `validate` checks them.
    """
    store = open_store(path)
    spec = store.spec
    records = store.records()
    if verify:
        verify_store(store, records=records)
    summary = summarize_records(store, records, summary_rows(store))
    labels = verify_labels(store) if verify else store.array("labels")[:]
    counts = np.bincount(labels[labels != LABEL_FILL], minlength=spec.num_classes)
    failures = [asdict(f) for r in records if r for f in r.failures]
    missing = [i for i, r in enumerate(records) if r is None]
    return {
        "path": store.path,
        "format_version": spec.to_attrs()["format_version"],
        "samples": spec.num_samples,
        "samples_written": summary["samples_written"],
        "latent_shape": list(spec.latent_shape),
        "variants": list(spec.variants),
        "posterior": spec.posterior,
        "image_size": spec.image_size,
        "crop": spec.crop,
        "classes": spec.num_classes,
        "per_class_min": int(counts.min()) if counts.size else 0,
        "per_class_max": int(counts.max()) if counts.size else 0,
        "bytes_on_disk": _bytes_on_disk(store),
        "vae": asdict(spec.vae),
        "quantization": spec.quant.to_attrs() if spec.quant else {"scheme": "none"},
        "clipped_fraction": summary["clipped_fraction"],
        "channel_mean": summary.get("channel_mean"),
        "channel_std": summary.get("channel_std"),
        "arrays": [_describe_array(store, a.name, summary) for a in spec.arrays],
        "shards_complete": summary["shards_complete"],
        "shards_total": summary["shards_total"],
        "incomplete": _format_ranges(missing) if missing else "",
        "failures": len(failures),
        "failure_reasons": summary["failure_reasons"],
        "failures_first": failures[:FAILURES_SHOWN],
        "image_modes": summary["image_modes"],
        "source": dict(spec.source),
        "tool_version": spec.tool_version,
        "command": spec.command,
    }


def _describe_array(store: LatentStore, name: str, summary: dict) -> dict:
    """One declared array: its declaration, bytes per sample, and its summarized statistics."""
    array, spec = store.spec.array(name), store.spec
    section = (summary.get(ARRAYS_KEY) or {}).get(name, {})
    if spec.format_version == 1 and name == "latents":
        section = summary
    return {
        **array.to_attrs(),
        "quant": array.quant.to_attrs()["scheme"] if array.quant else None,
        "row_shape": list(spec.row_shape(name)),
        "bytes_per_sample": array.nbytes_per_sample(len(spec.variants)),
        "added": array.added,
        "position_stats": spec.has_stats(name),
        **{k: section.get(k) for k in ("clipped_fraction", "channel_mean", "channel_std")},
    }


def format_description(d: dict) -> str:
    """Human-readable lines for `describe_store`'s dict."""

    def floats(xs):
        return "[" + ", ".join(f"{x:.4g}" for x in xs) + "]"

    size = f"{d['bytes_on_disk'] / 1e6:.1f} MB" if d["bytes_on_disk"] is not None else "remote"
    complete = "complete" if not d["incomplete"] else f"INCOMPLETE: {d['incomplete']}"
    lines = [
        f"store        {d['path']}  (format v{d['format_version']}, {size})",
        f"samples      {d['samples_written']} written of {d['samples']}, {d['failures']} failed",
        f"shards       {d['shards_complete']}/{d['shards_total']} {complete}",
        f"latents      {'x'.join(map(str, d['latent_shape']))} uint8, variants {', '.join(d['variants'])}, posterior {d['posterior']}",
        f"images       {d['image_size']} px, crop {d['crop']}, modes {d['image_modes']}",
        f"classes      {d['classes']} (per class: min {d['per_class_min']}, max {d['per_class_max']})",
        f"vae          {d['vae']['id']} ({_vae(d['vae'])})",
        f"quantization {d['quantization']['scheme']}, clipped {_clipped(d['clipped_fraction'])}",
        f"mean         {floats(d['channel_mean'] or [])}",
        f"std          {floats(d['channel_std'] or [])}",
    ]
    for a in d["arrays"]:
        kind = f"{a['dtype']} {a['quant'] or 'unquantized'}"
        added = ", added" if a["added"] else ""
        stats = "per position" if a["position_stats"] else "per channel"
        lines.append(
            f"array        {a['name']}: {'x'.join(map(str, a['row_shape']))} {kind}, "
            f"{a['bytes_per_sample']} B/sample, statistics {stats}{added}{_made_by(a)}"
        )
    if d["failures"]:
        lines.append(f"failures     {d['failure_reasons']}")
        lines += [f"  {f['key']}: {f['reason']}" for f in d["failures_first"]]
    return "\n".join(lines)


def _made_by(array: dict) -> str:
    """', made by ENCODER (CLASS), stored with cosine 0.99998' from a declaration's made_by."""
    made = array.get("made_by") or {}
    if not made.get("encoder"):
        return ""
    text = f", made by {made['encoder']} ({made.get('class')})"
    projection = made.get("projection") or {}
    if projection.get("dims"):
        kept = projection.get("explained_variance")
        text += f", PCA to {projection['dims']} dims" + (
            f" ({kept:.1%} of the variance)" if kept else ""
        )
    cosine = (made.get("quantization_error") or {}).get("cosine")
    return text + (f", stored with cosine {cosine:.5f}" if cosine is not None else "")


def _vae(vae: dict) -> str:
    """'AutoencoderKL, f8, 4 channels, pixels in [-1, 1], gaussian posterior, scaling 0.18215'."""
    low, high = vae.get("image_range") or (-1.0, 1.0)
    parts = [
        vae["cls"],
        f"f{vae.get('downsampling', 8)}",
        f"{vae.get('latent_channels', 4)} channels",
        f"pixels in [{low:g}, {high:g}]",
        f"{vae.get('posterior_kind', 'gaussian')} posterior",
        f"scaling {vae['scaling_factor']}",
    ]
    if vae.get("shift_factor") is not None:
        parts.append(f"shift {vae['shift_factor']}")
    if vae.get("normalized_by"):
        parts.append(f"normalized by {vae['normalized_by']}")
    return ", ".join(parts)


def _clipped(value: float | None) -> str:
    return "not summarized" if value is None else f"{value:.2e}"
