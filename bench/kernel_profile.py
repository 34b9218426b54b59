"""Where a piece of work spends its time, by kernel class, from one `torch.profiler` run.

    summary = profile_call(lambda: decoder(z), device, ranges=("dit",))

Kernel names (CUDA) or aten op names (CPU) are sorted into classes by the first pattern they
contain. On CUDA the kernels' own time is summed and the host gap is the wall time the device was
idle; on the CPU the ops' self time is summed and the rest of the wall time is Python and dispatch.
`ranges` are `record_function` labels whose total time is reported too (e.g. the DiT's forward
inside a guided solver step).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# (class, name fragments), first match wins; lower-case fragments, matched on lower-case names
KERNEL_CLASSES: list[tuple[str, tuple[str, ...]]] = [
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "cudnn_mha")),
    ("gemm", ("gemm", "cutlass", "cublas", "xmma", "sm90_", "sm80_", "aten::mm", "aten::addmm",
              "aten::bmm", "aten::linear", "aten::matmul", "mkldnn_linear")),
    ("conv", ("conv", "winograd", "implicit_gemm", "dgrad", "wgrad")),
    ("norm", ("norm",)),
    ("fused (inductor/triton)", ("triton", "cpp_fused", "fused")),
    ("copy/cast", ("copy", "memcpy", "memset", "aten::cat", "cat_", "to_copy", "fill", "stack")),
    ("views/allocation", ("as_strided", "aten::view", "aten::t", "aten::empty", "aten::expand",
                          "aten::reshape", "aten::transpose", "aten::permute", "aten::slice",
                          "aten::unsqueeze", "aten::select", "aten::split", "aten::chunk",
                          "aten::unflatten", "aten::alias", "aten::detach", "aten::lift")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce", "aten::add", "aten::mul",
                     "aten::sub", "aten::div", "gelu", "silu", "where", "exp", "sin", "cos",
                     "clamp", "round", "aten::neg", "aten::pow", "softmax")),
]  # fmt: skip


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, fragments in KERNEL_CLASSES:
        if any(f in low for f in fragments):
            return cls
    return "other"


def _self_us(event, cuda: bool) -> float:
    if cuda:
        return float(getattr(event, "self_device_time_total", 0.0))
    return float(event.self_cpu_time_total)


def profile_call(
    fn: Callable[[], object], device: torch.device, *, ranges: Sequence[str] = ()
) -> dict:
    """Run fn() once under the profiler; {wall_ms, busy_ms, host_gap_ms, classes, ranges, top}."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        if not kernels:  # older profilers attribute kernel time to the aten ops only
            kernels = [e for e in events if e.key.startswith("aten::")]
    else:
        kernels = [e for e in events if e.key.startswith("aten::")]
    classes: dict[str, float] = {}
    for e in kernels:
        cls = kernel_class(e.key)
        classes[cls] = classes.get(cls, 0.0) + _self_us(e, cuda) / 1e3
    busy_ms = sum(classes.values())
    labelled = {e.key: e for e in events if e.key in ranges}
    top = sorted(kernels, key=lambda e: _self_us(e, cuda), reverse=True)[:12]
    return {
        "wall_ms": round(wall_ms, 3),
        "busy_ms": round(busy_ms, 3),
        ("host_gap_ms" if cuda else "python_and_dispatch_ms"): round(wall_ms - busy_ms, 3),
        "classes_ms": {k: round(v, 3) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
        "classes_share": {
            k: round(v / busy_ms, 4) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])
        }
        if busy_ms
        else {},
        "ranges_ms": {
            k: round(
                float(getattr(e, "device_time_total", 0.0) if cuda else e.cpu_time_total) / 1e3, 3
            )
            for k, e in labelled.items()
        },
        "top": [
            {
                "name": e.key[:90],
                "class": kernel_class(e.key),
                "ms": round(_self_us(e, cuda) / 1e3, 3),
            }
            for e in top
        ],
    }
