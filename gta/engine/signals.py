"""Stop signals become "checkpoint at the end of this iteration, then do what the signal meant".

Schedulers announce the end of a job with a signal: SLURM sends SIGTERM before killing a preempted or
timed-out job, and submitit asks SLURM for SIGUSR2 90 s before the time limit (then requeues the job
from its own handler). While training, :class:`StopSignals` only records such a signal; the trainer saves
a checkpoint at the end of the current iteration and then hands the signal to whichever handler was
installed before: the default action stops training (the caller exits), a Python handler (submitit's
requeue) is called, an ignored signal is ignored.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, n))


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving its state."""

    def __init__(self, signum: int, iteration: int, checkpoint) -> None:
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after iteration {iteration}; the state is saved in "
            f"{checkpoint}: run the same command again (same run directory) or pass resume={checkpoint} "
            "to continue"
        )


class StopSignals:
    """Context manager that records stop signals instead of acting on them (main thread only)."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def hand_over(self) -> bool:
        """Pass the received signal to the handler installed before ours; True when training must stop.

        The default action of every stop signal is to end the process, so the caller stops (and exits)
        itself; a Python handler is called and may end the process (submitit requeues, then exits).
        """
        signum, self.received = self.received, None
        if signum is None:
            return False
        previous = self._previous.get(signum, signal.SIG_DFL)
        if previous in (signal.SIG_DFL, None):  # None: a handler installed outside Python
            return True
        if callable(previous):
            previous(signum, None)
        return False
