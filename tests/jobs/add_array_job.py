"""Add a copy of the latents (array "feat") to a store and fill it; optionally stop after one
shard's data is on disk, before its record (the test kills it there).

    python add_array_job.py STORE [--pause-at SHARD]
"""

from __future__ import annotations

import sys
import time

from latent_store import AddedArrayWriter, add_array, finalize_store, open_store
from testkit.stores import copy_declaration, fill_added


class PausingWriter(AddedArrayWriter):
    def __init__(self, *args, pause_at: int | None = None, **kw) -> None:
        self.pause_at = pause_at
        super().__init__(*args, **kw)

    def _sync(self, shard, names):
        super()._sync(shard, names)
        if shard == self.pause_at:
            print(f"DATA {shard}", flush=True)
            time.sleep(60)


def main(path: str, pause_at: int | None) -> None:
    store = add_array(path, copy_declaration(open_store(path).spec))
    fill_added(PausingWriter(store, "feat", pause_at=pause_at))
    finalize_store(store)


if __name__ == "__main__":
    args = sys.argv[1:]
    pause = int(args[args.index("--pause-at") + 1]) if "--pause-at" in args else None
    main(args[0], pause)
