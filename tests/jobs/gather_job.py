"""Exercise `foundation.distributed`'s gathers on 2 ranks; rank 0 writes what it got as JSON.

    torchrun --nproc_per_node=2 tests/jobs/gather_job.py OUT.json

Used by the test of gather_rows (uneven counts, a rank without rows, no rows at all), on_all
(an error of rank 1 raised on both) and on_main (rank 0's result on both).
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from foundation import distributed
from foundation.errors import LatentditError

info = distributed.setup_distributed("cpu")
rank = info.rank
rows = np.arange(rank * 100, rank * 100 + 3 * (rank + 1), dtype=np.float32).reshape(-1, 3)
seen = {
    "uneven": distributed.gather_rows(rows),  # rank 0: 1 row, rank 1: 2 rows
    "only_rank_1": distributed.gather_rows(rows if rank == 1 else None),
    "none": distributed.gather_rows(None),
}


def fail_on_rank_1():
    if rank == 1:
        raise LatentditError("rank 1 failed")
    return rank


try:
    distributed.on_all(fail_on_rank_1)
    seen["on_all"] = None
except LatentditError as e:
    seen["on_all"] = str(e)
seen["on_main"] = distributed.all_gather_objects(distributed.on_main(lambda: f"from {rank}"))
if rank == 0:
    out = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in seen.items()}
    Path(sys.argv[1]).write_text(json.dumps(out))
else:
    assert all(seen[k] is None for k in ("uneven", "only_rank_1", "none")), seen
distributed.teardown_distributed()
