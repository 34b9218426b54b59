"""A clean stop on SIGTERM, SIGINT or SIGUSR1: what schedulers send some time before they kill a job.

    with StopSignals() as stop:                      # every rank, around the work loop
        for step in steps:
            ...                                      # one unit of work, never cut
            if (signum := stop.agreed()) is not None:  # the same answer on every rank
                save(...)
                raise Preempted(signum, f"stopped after step {step}; re-run to resume")

SLURM sends SIGUSR1 ahead of the time limit when asked (`#SBATCH --signal=USR1@120`) and SIGTERM
on preemption, `scancel` and at the limit; cloud schedulers and Kubernetes send SIGTERM; a
terminal sends SIGINT. The first signal only sets a flag: the command finishes the unit of work in
hand (a training step, a batch of samples, the shard write in flight), writes what a resume needs,
logs one line and exits with 128 + the signal's number, the code a shell reports for a process
that signal killed. A second signal aborts at once through the signal's default action: what was
being written then is a temporary file or folder, and the previous checkpoint or part is intact.

Signals within REPEAT_WINDOW_S of the first count as the first: SLURM signals every process of a
job step and torchrun (`--signals-to-handle`) forwards what it receives to its workers, so a rank
gets the one signal twice within milliseconds; a deliberate second signal comes later.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

from foundation.distributed import cpu_group, max_over_ranks, rank_and_world, start_max_over_ranks

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
SIGNAL_EXIT_BASE = 128  # a shell's exit status for a process killed by signal N is 128 + N
REPEAT_WINDOW_S = 1.0  # later signals within this many seconds are the first one delivered again


class Preempted(SystemExit):
    """A command stopped cleanly on a signal: the process exits with code 128 + signum.

    A SystemExit, so that `except Exception` blocks on the way up do not swallow it and the
    command line needs no handler; `message` says what was saved and how to resume.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(SIGNAL_EXIT_BASE + signum)
        self.signum, self.message = signum, message


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def stopped(signum: int, what: str, *, main: bool) -> Preempted:
    """The exit of a command stopped by `signum`: "SIGTERM: {what}" logged once (by the process
    that `main` names, e.g. rank 0), and the Preempted to raise on every rank."""
    message = f"{signal_name(signum)}: {what}"
    if main:
        log.warning(message)
    return Preempted(signum, message)


class StopSignals:
    """Turn STOP_SIGNALS into a request to stop at the next safe point, inside the `with` block.

    Handlers are installed only in the main thread (Python delivers signals there) and restored
    on exit. Under torchrun, enter it on every rank at the same point: with several ranks it
    makes the CPU (gloo) group that `agreed` reduces over.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._pending = None  # the reduction an overlapped `agreed` left running

    def __enter__(self) -> StopSignals:
        if rank_and_world()[1] > 1:
            cpu_group()  # collective: made now, while every rank is here
        if threading.current_thread() is not threading.main_thread():
            log.debug("not the main thread: SIGTERM/SIGINT/SIGUSR1 keep their handlers")
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        if self._pending is not None and exc_type is None:  # every rank started it: it ends
            self._pending()
        self._pending = None

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal (no collective)."""
        return self.signum is not None

    def agreed(self, *, overlap: bool = False) -> int | None:
        """The stop signal any rank received (the highest number if several), or None; the same
        on every rank. With several ranks, a collective: every rank must call it at the same
        point. It reduces one integer on the CPU (gloo), so it never waits for a GPU.

        overlap: for a check after every step. The answer is that of the previous call's
        flags, while this call's reduction runs in the background during the next step, so no
        call waits for a message round; the ranks then stop one step after the step in which
        the signal came (the first call answers None). One process answers at once.
        """
        if rank_and_world()[1] == 1:
            return self.signum
        if not overlap:
            return max_over_ranks(self.signum or 0) or None
        previous, self._pending = self._pending, start_max_over_ranks(self.signum or 0)
        signum = previous() if previous is not None else 0
        if signum:  # every rank stops now: the reduction just started must end too
            self._pending()
            self._pending = None
        return signum or None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            log.warning(
                "%s received: stopping after the work in hand (a second signal aborts at once)",
                signal_name(signum),
            )
            return
        if now - self._first_at < REPEAT_WINDOW_S:
            return  # the first signal again, from another sender (torchrun, a process group)
        # the second signal: the default action (terminate) at once, no Python code in between
        os.write(2, f"{signal_name(signum)} again: aborting now\n".encode())
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def ignore_stop_signals(*_: object) -> None:
    """For worker processes (a DataLoader's `worker_init_fn`): leave stopping to the main process,
    which shuts its workers down when it stops; a worker killed by a signal sent to the whole
    process group would make the main process fail instead of stopping cleanly."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
