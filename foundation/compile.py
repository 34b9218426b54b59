"""A torch.compile cache that a resumed or multi-rank run finds again, and its portable artifacts.

    with compile_cache(Path("runs/x/compile-cache"), save=dist.is_main):
        compiled = torch.compile(module)      # compiles now, or loads what an earlier run compiled

Inductor keeps compiled graphs, autotuning results and Triton kernels in a cache folder (by
default one per user under /tmp, lost with the machine and not shared between nodes). Here the
folder is chosen, and on leaving, the process's compile artifacts are also saved as one file
(`torch.compiler.save_cache_artifacts`) that any later process loads first, on this machine or any
other that sees the folder: a resumed run or another rank then spends seconds, not minutes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""torch.compile's modes; "reduce-overhead" and "max-autotune" replay CUDA graphs (on CUDA)."""
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch._inductor.list_mode_options()
ARTIFACTS = "artifacts.bin"  # torch.compiler.save_cache_artifacts of the last process that saved
ENV_DIRS = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def uses_cuda_graphs(mode: str) -> bool:
    """Whether torch.compile in `mode` replays CUDA graphs on CUDA: each replay then writes its
    outputs into the same static buffers, so a caller must copy (or clone) what it keeps before
    the next call, and mark each call a new step (`torch.compiler.cudagraph_mark_step_begin`)."""
    return mode in CUDA_GRAPH_MODES


@contextlib.contextmanager
def compile_cache(folder: Path | None, *, save: bool = True) -> Iterator[None]:
    """Inside: torch.compile caches under `folder` (None: torch's defaults, nothing changes).

    Loads `folder/artifacts.bin` on entry when it is there; with `save`, writes the artifacts of
    everything this process compiled on exit (atomically). Environment variables are restored.
    """
    if folder is None:
        yield
        return
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    before = {name: os.environ.get(name) for name in ENV_DIRS}
    os.environ.update({name: str(folder / sub) for name, sub in ENV_DIRS.items()})
    artifacts = folder / ARTIFACTS
    try:
        if artifacts.is_file():
            info = torch.compiler.load_cache_artifacts(artifacts.read_bytes())
            log.info("compile cache: loaded %s (%s)", artifacts, info)
        yield
        if save:
            saved = torch.compiler.save_cache_artifacts()
            if saved is not None and saved[0]:
                tmp = artifacts.with_name(f"{ARTIFACTS}.{os.getpid()}.tmp")
                tmp.write_bytes(saved[0])
                os.replace(tmp, artifacts)
                log.info("compile cache: saved %s (%d bytes)", artifacts, len(saved[0]))
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
