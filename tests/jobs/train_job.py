"""Run `latentdit train ARGS...`, but pause for good after log record --pause-after K is written.

    python tests/jobs/train_job.py --pause-after K train --store S --run R ...

Used by the kill-and-resume test: it SIGKILLs this process while it pauses, after a checkpoint
and after later steps that the checkpoint does not hold.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cli import main
from trainer.metrics import TrainLogger

pause_after = int(sys.argv[2])
sys.argv = [sys.argv[0], *sys.argv[3:]]
write = TrainLogger._write


def write_then_pause(self, record):
    write(self, record)
    if record["step"] == pause_after:
        print(f"PAUSED {pause_after}", flush=True)
        time.sleep(120)


TrainLogger._write = write_then_pause
main()
