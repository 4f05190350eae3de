"""Training progress for a person watching: a live bar on a terminal, plain log lines elsewhere.

A bar redraws itself with carriage returns, which a SLURM log or a pipe records as one endless line;
there, every ``every`` iterations one self-contained line is printed instead. Both show the step, the
rate, the time left, the latest losses, the learning rate and the last validation mIoU.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TextIO

from tqdm.auto import tqdm

from gta.errors import ConfigError

MODES = ("auto", "bar", "lines", "none")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressReport:
    """``mode``: "bar", "lines", "none", or "auto" (a bar when ``stream`` is a terminal, else lines)."""

    def __init__(self, start: int, total: int, every: int, mode: str = "auto", stream: TextIO | None = None) -> None:
        if mode not in MODES:
            raise ConfigError(f"trainer.progress must be one of {MODES}, got '{mode}'")
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode, self.every = mode, max(1, every)
        self.start, self.step, self.total = start, start, total
        self.fields: dict[str, str] = {}
        self._started = time.perf_counter()
        self._bar = (
            tqdm(desc="train", initial=start, total=total, dynamic_ncols=True, file=self.stream)
            if mode == "bar" else None
        )  # fmt: skip

    def set(self, values: Mapping[str, float], fmt: str = ".3g") -> None:
        """Show these values from now on (``fmt`` formats each one), replacing older ones of the same name."""
        self.fields.update({name: format(value, fmt) for name, value in values.items()})
        if self._bar is not None:
            self._bar.set_postfix(self.fields, refresh=False)

    def advance(self, step: int) -> None:
        """Iteration ``step`` (1-based) is done."""
        done, self.step = step - self.step, step
        if self._bar is not None:
            self._bar.update(done)
        elif self.mode == "lines" and (step % self.every == 0 or step == self.total):
            self.write(self.line())

    def line(self) -> str:
        elapsed = time.perf_counter() - self._started
        rate = (self.step - self.start) / elapsed if elapsed > 0 else 0.0
        eta = _duration((self.total - self.step) / rate) if rate > 0 else "?"
        values = " ".join(f"{name} {value}" for name, value in self.fields.items())
        return (
            f"train {self.step}/{self.total} ({self.step / self.total:.0%}) | {rate:.2f} it/s | "
            f"elapsed {_duration(elapsed)} | eta {eta}" + (f" | {values}" if values else "")
        )

    def write(self, message: str) -> None:
        """A line that stays (an evaluation result), without breaking a bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        elif self.mode != "none":
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> ProgressReport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
