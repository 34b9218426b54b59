"""Run `latentdit sample ARGS...`, but on rank R fail after its first K npz parts.

    torchrun --nproc_per_node=2 tests/jobs/sample_job.py --fail-rank 1 --fail-after 1 sample RUN ...

Used by the test that an interrupted multi-rank run resumes to the `.npz` of a one-process run.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cli import main
from sampler import outputs

fail_rank, fail_after = int(sys.argv[2]), int(sys.argv[4])
sys.argv = [sys.argv[0], *sys.argv[5:]]
write_part, written = outputs.write_part, []


def write_then_fail(out, start, images):
    if int(os.environ.get("RANK", 0)) == fail_rank and len(written) == fail_after:
        raise RuntimeError(f"rank {fail_rank} fails after {fail_after} parts")
    written.append(start)
    write_part(out, start, images)


outputs.write_part = write_then_fail
main()
