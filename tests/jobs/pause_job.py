"""Run a latentdit command, but pause at a known point until a stop signal arrives (or 120 s).

    python tests/jobs/pause_job.py step 5 train --store S --run R ...    # after training step 5
    python tests/jobs/pause_job.py solve 3 sample RUN --out O ...        # the 3rd batch solved
    python tests/jobs/pause_job.py shard 1 encode SRC --out STORE ...    # after the 1st shard
    python tests/jobs/pause_job.py save 5 train ...       # step 5, then inside the checkpoint write
    torchrun ... tests/jobs/pause_job.py -- step 5 train ...             # every rank pauses

Each process prints "PID <rank> <pid>" first; rank 0 prints "PAUSED <point> <k>" when it pauses
(and "WRITING" when `save` holds a checkpoint write half done). The process waits until its
`foundation.preemption.StopSignals` handler has seen a signal, so that a test's signal lands at
that point: between two training steps, with a batch of samples in hand, after a shard was
written, or (`save`) inside the write the first signal started, where a second signal must abort
it.
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import sampler.sample as sample_module
from cli import main
from latent_store import StoreWriter
from trainer import checkpoint
from trainer.metrics import TrainLogger

args = sys.argv[2:] if sys.argv[1] == "--" else sys.argv[1:]  # torchrun: job.py -- point k ...
point, k = args[0], int(args[1])
sys.argv = [sys.argv[0], *args[2:]]
RANK = int(os.environ.get("RANK", "0"))


def stop_requested() -> bool:
    """Whether the StopSignals handler of the running command has seen a signal."""
    handler = signal.getsignal(signal.SIGTERM)
    return bool(getattr(getattr(handler, "__self__", None), "requested", False))


def say(line: str) -> None:
    """One line on stdout in one write: two ranks share the pipe, and a line must not split."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


def pause(line: str) -> None:
    if RANK == 0:
        say(line)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not stop_requested():
        time.sleep(0.02)


def after(cls_or_module, name: str, should_pause) -> None:
    """Wrap cls_or_module.name: call it, then pause when should_pause(call count, args) says."""
    real, calls = getattr(cls_or_module, name), []

    def wrapped(*a, **kw):
        result = real(*a, **kw)
        calls.append(1)
        if should_pause(len(calls), a):
            pause(f"PAUSED {point} {k}")
        return result

    setattr(cls_or_module, name, wrapped)


def hold_write(*a, **kw) -> None:
    """The first weights file of a checkpoint written on a signal, then a wait for the next."""
    save_file(*a, **kw)
    if stop_requested():
        say("WRITING")
        time.sleep(120)  # a second signal kills the process here


say(f"PID {RANK} {os.getpid()}")
if point in ("step", "save"):
    after(TrainLogger, "update", lambda n, a: a[1] == k)
if point == "save":
    save_file, checkpoint.save_file = checkpoint.save_file, hold_write
if point == "solve":
    after(sample_module, "make_latents", lambda n, a: n == k)
if point == "shard":
    after(StoreWriter, "write_shard", lambda n, a: n == k)
main()
