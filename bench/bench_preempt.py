"""What preemption handling costs: the per-step stop check of `train`, and decoding a 16-bit bomb.

    python bench/bench_preempt.py [--calls 2000] [--bomb-side 8960]

Prints one JSON object:
- `stop_check_us`: microseconds a step spends in `StopSignals.agreed()` (the check `train` makes
  after every step): one process (a flag read); two gloo processes on this machine, blocking
  (one all-reduce of one int64 on the CPU group, waited for) and overlapped (`overlap=True`, what
  `train` uses: the reduction runs during the next step), each with no work between the checks
  and with a simulated step of `--step-ms` (a sleep, as the host waits while a GPU works). None
  of them waits for a GPU. Two processes on 127.0.0.1 give the floor of a message round: across
  nodes add the network's round-trip time.
- `bomb`: peak RSS of decoding and cropping a 16-bit grayscale PNG of SIDE x SIDE zeros (~156 KB
  for 8960) with `pipeline.preprocess.preprocess` in a fresh process, before any image was
  decoded and at the end; `--code DIR` runs another checkout's code (e.g. the main branch) for
  the before/after comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, calls: int, overlap: bool, step_s: float, out) -> None:
    import torch.distributed as dist

    from foundation.preemption import StopSignals

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with StopSignals() as stop:
        for _ in range(50):  # warm up the connections
            stop.agreed(overlap=overlap)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(calls if step_s else 0):  # the steps alone: what a sleep really takes
            time.sleep(step_s)
        steps_alone = time.perf_counter() - t0
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            if step_s:
                time.sleep(step_s)
            stop.agreed(overlap=overlap)
        seconds = time.perf_counter() - t0 - steps_alone
    if rank == 0:
        out.put(seconds / calls * 1e6)
    dist.destroy_process_group()


def stop_check_us(world: int, calls: int, *, overlap: bool = False, step_ms: float = 0) -> float:
    """Microseconds per step spent in agreed() on `world` gloo processes (1: no collective)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = _free_port()
    args = (world, port, calls, overlap, step_ms / 1000, out)
    procs = [ctx.Process(target=_rank, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return round(out.get(), 2)


BOMB_PROBE = """
import resource, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.preprocess import PreprocessConfig, preprocess
data = open(sys.argv[2], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
try:
    preprocess(data, PreprocessConfig(image_size=256))
    outcome = "decoded"
except Exception as e:  # the refusal is the expected outcome after the fix
    outcome = f"refused: {str(e)[:80]}"
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{before:.0f} {peak:.0f} {time.perf_counter() - t0:.2f} {outcome}")
"""


def bomb_rss(code: Path, side: int) -> dict:
    from testkit.hostile import png16_bomb

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bomb16.png"
        path.write_bytes(png16_bomb(side, side))
        done = subprocess.run(
            [sys.executable, "-c", BOMB_PROBE, str(code), str(path)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        before, peak, seconds, outcome = done.stdout.split(maxsplit=3)
        return {
            "code": str(code), "file_kb": round(path.stat().st_size / 1024), "side": side,
            "rss_before_mb": int(before), "rss_peak_mb": int(peak), "seconds": float(seconds),
            "outcome": outcome.strip(),
        }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--step-ms", type=float, default=5.0, help="simulated step between checks")
    ap.add_argument("--bomb-side", type=int, default=8960)
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose preprocess to probe")
    args = ap.parse_args()
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "stop_check_us": {
            "one_process": stop_check_us(1, args.calls),
            "two_gloo_blocking": stop_check_us(2, args.calls),
            "two_gloo_overlapped": stop_check_us(2, args.calls, overlap=True),
            f"two_gloo_blocking_{args.step_ms:g}ms_steps": stop_check_us(
                2, args.calls // 5, step_ms=args.step_ms
            ),
            f"two_gloo_overlapped_{args.step_ms:g}ms_steps": stop_check_us(
                2, args.calls // 5, overlap=True, step_ms=args.step_ms
            ),
        },
        "bomb": bomb_rss(args.code, args.bomb_side),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
