"""Where device time goes: a torch.profiler trace summed by kernel class, with achieved rates.

    with profile_region() as prof:
        work()
    summary = summarize(prof, seconds=wall, flops=flop_counts(fn), bytes_by_class={...})

Used by bench/profile_encode.py, bench/profile_train.py and bench/bench_sample.py (profile_call). On CUDA every kernel is put in a
class from its own name and the chain of ops that launched it (inductor's kernel names carry the
ops they fused, e.g. triton_red_fused_native_group_norm_silu_0); on the CPU there are no kernels,
so each op's self time stands in for them (only good for checking that the scripts run).
Classes are tried in order; the first whose pattern matches wins.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

CLASSES: list[tuple[str, str]] = [
    ("all_reduce", r"nccl|all_?reduce|c10d|gloo"),
    ("optimizer", r"adam"),
    ("ema", r"lerp|\bema\b"),
    ("grad_clip", r"foreach_norm|clip_grad|grad_clip"),
    ("attention", r"flash|fmha|attention|sdpa|\bmha"),
    ("group_norm", r"group_?norm|rowwisemoments|computefusedparams"),
    ("layer_norm", r"layer_?norm"),
    ("cast", r"_to_copy|convert_element_type"),
    ("convolution", r"convolution|conv2d|cudnn|implicit|fprop|dgrad|wgrad|winograd"),
    ("gemm", r"gemm|matmul|\b(add)?mm\b|bmm|linear|cublas|cutlass|nvjet|xmma|_mm_"),
    ("layout", r"copy|\bcat\b|catarray|stack|transpose|permute|contiguous|clone|nchw|nhwc"),
    ("elementwise", r"elementwise|vectorized|triton_poi|silu|gelu|add|mul|div|sub|exp|where"),
    ("reduction", r"reduce|\bsum\b|\bmean\b|triton_red|triton_per|norm"),
]
FLOP_CLASSES = {  # torch.utils.flop_counter op names -> kernel class
    "convolution": "convolution",
    "convolution_backward": "convolution",
    "mm": "gemm",
    "addmm": "gemm",
    "bmm": "gemm",
    "baddbmm": "gemm",
}


def classify(text: str) -> str:
    """The first class whose pattern matches `text` (a kernel name and its ops), else "other"."""
    low = text.lower()
    for name, pattern in CLASSES:
        if re.search(pattern, low):
            return name
    return "other"


def profile_region():
    """A torch.profiler over CPU ops and, when there is a GPU, its kernels."""
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    return profile(activities=activities, record_shapes=False)


def _chain(event) -> str:
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return " < ".join(names)


def _busy_us(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(time covered by at least one interval, first start to last end), in the intervals' unit."""
    if not intervals:
        return 0.0, 0.0
    intervals.sort()
    busy, (start, end) = 0.0, intervals[0]
    first = start
    for a, b in intervals[1:]:
        if a > end:
            busy, start = busy + end - start, a
        end = max(end, b)
    return busy + end - start, end - first


def class_times(prof) -> tuple[dict[str, float], dict]:
    """Seconds per class, and how busy the device was (kernels' union over their span)."""
    times: dict[str, float] = defaultdict(float)
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    if kernels:
        for op in events:
            if op.device_type == DeviceType.CPU:
                chain = _chain(op)
                for k in op.kernels:
                    times[classify(f"{k.name} | {chain}")] += k.duration / 1e6
        spans = [(e.time_range.start, e.time_range.end) for e in kernels]
        busy, span = _busy_us(spans)
        attributed = sum(times.values())
        total = sum(b - a for a, b in spans) / 1e6
        if total > attributed:  # kernels no op claimed (e.g. launched from another thread)
            times["unattributed"] += total - attributed
        timeline = {
            "kernels": len(kernels),
            "kernel_s": total,
            "device_busy_s": busy / 1e6,
            "device_span_s": span / 1e6,
            "idle_fraction_of_span": 1 - busy / span if span else None,
        }
        return dict(times), timeline
    for op in events:  # the CPU: self time of each op stands in for kernel time
        if op.device_type == DeviceType.CPU and op.self_cpu_time_total > 0:
            times[classify(_chain(op))] += op.self_cpu_time_total / 1e6
    return dict(times), {"kernels": 0, "note": "CPU: op self times, no device timeline"}


def flop_counts(fn) -> dict[str, float]:
    """FLOPs of one call of fn() per kernel class (convolution, gemm, attention), by op counting."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    out: dict[str, float] = defaultdict(float)
    for op, flops in counter.get_flop_counts()["Global"].items():
        name = str(op).split(".")[-1]
        out["attention" if "attention" in name else FLOP_CLASSES.get(name, "other")] += flops
    return dict(out)


def summarize(
    prof,
    *,
    calls: int,
    seconds: float,
    flops: dict[str, float] | None = None,
    bytes_by_class: dict[str, float] | None = None,
) -> dict:
    """One JSON-ready dict: per class, seconds per call, share, and TFLOP/s or GB/s where counted.

    `flops` and `bytes_by_class` are per call; `seconds` is the wall time of the `calls` calls.
    """
    times, timeline = class_times(prof)
    total = sum(times.values()) or 1.0
    classes = {}
    for name, t in sorted(times.items(), key=lambda kv: -kv[1]):
        row = {"s_per_call": t / calls, "share": t / total}
        if flops and flops.get(name):
            row["tflop_per_s"] = flops[name] * calls / t / 1e12
        if bytes_by_class and bytes_by_class.get(name):
            row["gb_per_s"] = bytes_by_class[name] * calls / t / 1e9
        classes[name] = row
    return {
        "calls": calls,
        "wall_s_per_call": seconds / calls,
        "timeline": timeline,
        "classes": classes,
        "flops_per_call": flops or {},
    }


def profile_call(fn, device: torch.device, *, ranges: tuple[str, ...] = ()) -> dict:
    """Run fn() once under the profiler: wall time, time per class, and `record_function` ranges.

    `ranges` are labels (e.g. "dit", the DiT forward inside a guided solver step) whose total time
    is reported beside the classes; the rest of the wall time is the host's (Python, dispatch).
    """
    import time

    cuda = device.type == "cuda"
    with profile_region() as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    times, timeline = class_times(prof)
    busy = sum(times.values())
    labelled = {e.key: e for e in prof.key_averages() if e.key in ranges}
    return {
        "wall_ms": round(wall * 1e3, 3),
        "busy_ms": round(busy * 1e3, 3),
        ("host_gap_ms" if cuda else "python_and_dispatch_ms"): round((wall - busy) * 1e3, 3),
        "timeline": timeline,
        "classes_ms": {
            k: round(v * 1e3, 3) for k, v in sorted(times.items(), key=lambda kv: -kv[1])
        },
        "ranges_ms": {
            k: round(float(e.device_time_total if cuda else e.cpu_time_total) / 1e3, 3)
            for k, e in labelled.items()
        },
    }
