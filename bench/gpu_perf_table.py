"""The table at the end of bench/gpu_perf.sh: one line per JSON result, the figures that matter.

python bench/gpu_perf_table.py OUT/results.jsonl
"""

from __future__ import annotations

import json
import sys

FIGURES = {  # key in a result -> column label
    "batch_size": "batch",
    "model": "model",
    "compile_mode": "mode",
    "graph_images_per_s": "graph img/s",
    "unfused_images_per_s": "unfused img/s",
    "graph_over_unfused": "graph/unfused",
    "pipeline_images_per_s": "pipeline img/s",
    "pipeline_over_graph": "pipe/graph",
    "codes_equal_to_unfused": "codes equal",
    "codes_max_diff": "max diff",
    "cudagraph_skips": "CUDA graph skips",
    "images_per_s": "img/s",
    "mfu": "MFU",
    "data_fraction": "data share",
    "peak_memory_gb": "peak GB",
    "images_per_s_profiled": "img/s (profiled)",
    "achieved_tflop_per_s": "TFLOP/s",
    "counted_tflop_per_s": "TFLOP/s",
    "host_syncs_per_step": "syncs/step",
}


def brief(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def line(result: dict) -> str:
    parts = [f"{FIGURES[k]} {brief(result[k])}" for k in FIGURES if result.get(k) is not None]
    if "classes" in result:  # profiles: the three largest kernel classes
        top = sorted(result["classes"].items(), key=lambda kv: -kv[1]["share"])[:4]
        parts.append("; ".join(f"{name} {row['share']:.0%}" for name, row in top))
    if result.get("skipped") or "exit" in result:
        parts.append("SKIPPED" if result.get("skipped") else f"EXIT {result['exit']}")
    return f"{result['step']:<34} " + ", ".join(parts)


def main() -> None:
    with open(sys.argv[1]) as f:
        for text in f:
            result = json.loads(text)
            if "compare" not in result:
                print(line(result))


if __name__ == "__main__":
    main()
