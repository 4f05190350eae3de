"""Stop signals become "checkpoint at the end of this iteration, then do what the signal meant".

Schedulers announce the end of a job with a signal: SLURM sends SIGTERM before killing a preempted or
timed-out job, and submitit asks SLURM for SIGUSR2 before the time limit (then requeues the job from its own
handler). A job records such a signal from the moment it starts building (:func:`stop_signals`, entered by the
command for the whole job and shared by the trainer). The trainer honours it at the end of the current iteration
(or before the first, for one that came while the job was building): it saves a checkpoint and then hands the
signal to whichever handler was installed before: the default action stops training (the caller exits), a Python
handler (submitit's requeue) is called, an ignored signal is ignored. Once training is over
(:meth:`StopSignals.finish`), a signal is ignored: evaluating, saving and logging a finished run take moments, and
the job ends as finished rather than being started again.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
        self.finished = False
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
        name = signal.Signals(signum).name
        if self.finished:
            _say(f"{name} after training: ignored, the job finishes")
        else:
            self.received = signum
            _say(f"{name} received: a checkpoint at the end of this iteration, then what the signal asks")

    def finish(self) -> None:
        """Training is over: from now on a stop signal is ignored, and the job finishes."""
        self.finished = True

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


def _say(line: str) -> None:
    os.write(sys.stderr.fileno(), f"{line}\n".encode())  # safe inside a handler, unlike print


_active: list[StopSignals] = []


@contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """The job's :class:`StopSignals`: the one a caller already entered (the command's, for the whole job), else a
    new one for this block."""
    if _active:
        yield _active[-1]
        return
    with StopSignals() as stop:
        _active.append(stop)
        try:
            yield stop
        finally:
            _active.pop()
