"""The non-finite-loss guard (``trainer.on_nonfinite``).

``stop`` costs no host-device sync per update: whether each loss was finite is recorded on the device,
and :meth:`NonFiniteGuard.check` reads the record (one sync) at log steps and before every evaluation and
checkpoint, so non-finite weights may sit in memory for a few iterations but never reach a file. ``skip``
must know before each step whether to take it, so it reads every loss on the host. With several processes
every rank sees every rank's losses, so all of them skip or stop together.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from gta.engine.distributed import Distributed
from gta.errors import ConfigError, UserError

MODES = ("stop", "skip")


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss was NaN or infinite (``trainer.on_nonfinite=stop``)."""


class NonFiniteGuard:
    def __init__(self, mode: str, dist: Distributed) -> None:
        if mode not in MODES:
            raise ConfigError(f"trainer.on_nonfinite must be one of {MODES}, got '{mode}'")
        self.mode, self.dist = mode, dist
        # stop: the updates since the last check, as (model, iteration), and on the device the 1-based
        # position among them of the first non-finite loss (0: none) and its value
        self._pending: list[tuple[str, int]] = []
        self._first = torch.zeros((), dtype=torch.long, device=dist.device)
        self._value = torch.zeros((), device=dist.device)

    def allows(self, name: str, iteration: int, loss: torch.Tensor) -> bool:
        """Whether model ``name``'s optimiser may step on ``loss`` at ``iteration`` (1-based)."""
        if self.mode == "skip":
            value = self.dist.nonfinite(loss)  # one host sync
            if value is not None:
                warnings.warn(
                    f"non-finite loss {value} for model '{name}' at iteration {iteration}; step skipped "
                    "(trainer.on_nonfinite=skip)", RuntimeWarning, 3,
                )
            return value is None
        self._pending.append((name, iteration))
        first = (self._first == 0) & ~loss.detach().isfinite()
        self._first = torch.where(first, len(self._pending), self._first)
        self._value = torch.where(first, loss.detach().float(), self._value)
        return True

    def check(self, iteration: int, saved: tuple[Path, int] | None) -> None:
        """Stop if a loss recorded since the last check was NaN or infinite; ``saved`` is the last
        checkpoint written (path, iteration), which the message says is intact."""
        if not self._pending:
            return
        local = torch.stack([self._first.double(), self._value.double()]).tolist()
        found = [(int(position), rank, value) for rank, (position, value) in enumerate(self.dist.gather_object(local))]
        first = min((position for position, _, _ in found if position), default=0)
        if first == 0:
            self._pending.clear()
            return
        name, at = self._pending[first - 1]
        values = ", ".join(
            f"{value} on rank {rank}" if self.dist.active else str(value)
            for position, rank, value in found if position == first
        )
        kept = f"the last checkpoint, {saved[0]} (iteration {saved[1]}), is intact" if saved else (
            "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"non-finite loss {values} for model '{name}' at iteration {at}; training stopped at iteration "
            f"{iteration} (losses are checked at log steps and before evaluations and checkpoints) and {kept}. "
            "Lower the learning rate, or set trainer.on_nonfinite=skip to skip such steps"
        )
