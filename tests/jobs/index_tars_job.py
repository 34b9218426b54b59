"""Open a webdataset source under torchrun; each rank writes what it sees as JSON.

    torchrun --nproc_per_node=2 tests/jobs/index_tars_job.py SOURCE OUT_DIR

Used by the test that the ranks, which share the tar indexing, all end with the same source.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from foundation import distributed
from pipeline.webdataset_source import open_webdataset

info = distributed.setup_distributed("cpu")
source = open_webdataset(sys.argv[1])
seen = {
    **source.describe(),
    "samples": [[source.key(i), source.label(i)] for i in range(len(source))],
}
Path(sys.argv[2], f"rank{info.rank}.json").write_text(json.dumps(seen))
distributed.teardown_distributed()
