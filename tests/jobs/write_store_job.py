"""Write a deterministic test store; with --pause-at K, stop after shard K's data (before its record).

    python tests/jobs/write_store_job.py OUT N [--pause-at K]

Used by the kill-and-resume test: the test SIGKILLs this process while it pauses.
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_spec, random_latents

from latent_store import LatentStore, StoreWriter, create_store, finalize_store
from latent_store.quantize import quantize


class PausingWriter(StoreWriter):
    def __init__(self, store, pause_at):
        super().__init__(store)
        self.pause_at = pause_at

    def _sync(self, shard, names):
        super()._sync(shard, names)
        if shard == self.pause_at:
            print(f"DATA {shard}", flush=True)
            time.sleep(60)


def main(out: str, n: int, pause_at: int | None) -> None:
    spec = make_spec(n)
    path = Path(out)
    store = (
        LatentStore(path)
        if path.exists()
        else create_store(path, spec, [f"k{i}" for i in range(n)])
    )
    x = random_latents(n)
    q, _ = quantize(x, spec.quant)
    labels = (np.arange(n) % spec.num_classes).astype(np.int16)
    writer = PausingWriter(store, pause_at)
    for shard in writer.todo:
        a, b = spec.shard_bounds(shard)
        writer.write_shard(shard, {"latents": q[a:b].numpy()}, labels[a:b])
    finalize_store(store)


if __name__ == "__main__":
    args = sys.argv[1:]
    pause = int(args[args.index("--pause-at") + 1]) if "--pause-at" in args else None
    main(args[0], int(args[1]), pause)
