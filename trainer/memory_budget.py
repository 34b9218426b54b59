"""Will the store fit? The size of `--data memory` / `--data gpu`, checked before anything loads.

    check_fits(store, mode="memory", device=torch.device("cpu"))   # or raises MemoryBudgetError

Each process of a node loads the whole array: every per-sample array the reader keeps (uint8
latents with all their variants, logstd of a "moments" store, labels), plus int64 bookkeeping per
sample (labels and store indices as loaded, the epoch's permutation and variant draws). While
loading, the reader also holds the shards it is reading (`in_flight`: one per load thread). That
must fit in the host RAM available (/proc/meminfo's MemAvailable, within the cgroup's limit when
there is one; else os.sysconf's free pages), less a margin for the process itself. `--data gpu`
also keeps the array and its labels on the device, where they may take half the memory free when
the data loads: the EMA, gradients, AdamW states and activations come after.

`LATENTDIT_MEMORY_BUDGET=BYTES` (e.g. 64G, 500M, 1000000) replaces the measured amount that the
data may take, host and device alike: to allow what the estimate refuses, or to test a refusal.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from foundation.errors import LatentditError
from latent_store import LatentStore
from latent_store.arrays import LABELS, LATENTS
from latent_store.reader import LOAD_THREADS

log = logging.getLogger(__name__)

ENV_BUDGET = "LATENTDIT_MEMORY_BUDGET"
BOOKKEEPING = 4 * 8  # int64 per sample: labels, indices (LatentArrays); permutation, variant
HOST_SHARE = 0.9  # of the available RAM: the rest for the interpreter, torch and the model
DEVICE_SHARE = 0.5  # of the GPU memory free at load: the rest for optimizer state, activations
UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


class MemoryBudgetError(LatentditError):
    """The store does not fit the data mode's memory."""


def sample_bytes(store: LatentStore, names: Sequence[str] = (LATENTS,)) -> int:
    """Bytes of one sample in the arrays `names` and the labels (all variants), as stored."""
    total = 0
    for name in (*names, LABELS):
        arr = store.array(name)
        total += math.prod(arr.shape[1:]) * arr.dtype.itemsize
    return total


def in_flight(store: LatentStore) -> int:
    """Samples the loader holds besides its result: one shard per load thread (`load_latents`)."""
    return min(LOAD_THREADS, store.spec.num_shards) * store.spec.shard_size


def budget_override() -> int | None:
    """LATENTDIT_MEMORY_BUDGET in bytes, or None when unset."""
    text = os.environ.get(ENV_BUDGET, "").strip()
    if not text:
        return None
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", text, re.IGNORECASE)
    if found is None:
        raise MemoryBudgetError(
            f"{ENV_BUDGET}={text!r} is not a size: give bytes, optionally with K, M, G or T (e.g. 64G)"
        )
    return int(float(found.group(1)) * UNITS[found.group(2).upper()])


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def cgroup_available(root: Path = CGROUP) -> int | None:
    """Bytes this cgroup may still allocate (limit - usage + reclaimable file cache), or None."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1: huge = unlimited
            stat = root / Path(limit_file).parent / "memory.stat"
            cache = re.search(r"^(?:total_)?inactive_file (\d+)$", _text(stat), re.MULTILINE)
            return max(0, limit - usage + (int(cache.group(1)) if cache else 0))
    return None


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def host_available(meminfo: Path = MEMINFO, cgroup: Path = CGROUP) -> int | None:
    """Host RAM a new allocation can take now, in bytes, or None where it cannot be told."""
    found = re.search(r"^MemAvailable:\s+(\d+) kB", _text(meminfo), re.MULTILINE)
    if found:
        available = int(found.group(1)) * 1024
    else:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limited = cgroup_available(cgroup)
    return available if limited is None else min(available, limited)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def check_fits(
    store: LatentStore, *, mode: str, device: torch.device, names: Sequence[str] = (LATENTS,)
) -> None:
    """Raise MemoryBudgetError (one line naming --data stream) if `mode` would not fit when it
    loads the arrays `names` (and the labels)."""
    if mode not in ("memory", "gpu"):
        return
    n, per_sample = store.spec.num_samples, sample_bytes(store, names)
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    override = budget_override()
    host_need = ranks * (n * (per_sample + BOOKKEEPING) + in_flight(store) * per_sample)
    measured = host_available()
    host_budget = override
    if override is None and measured is not None:
        host_budget = int(HOST_SHARE * measured)
    on_node = f" x {ranks} ranks on this node" if ranks > 1 else ""
    if host_budget is not None and host_need > host_budget:
        raise MemoryBudgetError(
            f"{store.path}: --data {mode} loads {n} samples x {per_sample} bytes (and "
            f"{in_flight(store)} in flight while loading{on_node}) = {_gb(host_need)} into host "
            "RAM, more than the "
            f"{_gb(host_budget)} it may take here; use --data stream (whole shards through a "
            f"shuffle buffer), or set {ENV_BUDGET} if you know better"
        )
    if mode == "gpu" and device.type == "cuda":
        device_need = n * (per_sample + 8)  # the array and its int64 labels
        free = (
            override
            if override is not None
            else int(DEVICE_SHARE * torch.cuda.mem_get_info(device)[0])
        )
        if device_need > free:
            raise MemoryBudgetError(
                f"{store.path}: --data gpu keeps {_gb(device_need)} on {device}, more than the "
                f"{_gb(free)} it may take there; use --data memory (host RAM) or --data stream"
            )
    log.debug(
        "--data %s: %s per rank fits (%s may be used)", mode, _gb(host_need / ranks), host_budget
    )
