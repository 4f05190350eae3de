"""The poly learning-rate schedule, computed from the global iteration so it never drifts or needs state."""

from __future__ import annotations

from torch.optim import Optimizer


def poly_factor(iteration: int, total: int, power: float) -> float:
    """(1 - t/T) ** power: 1 at the first iteration (and before it), 0 after the last."""
    return (1.0 - min(max(iteration, 0), total) / total) ** power


def set_lr(optimizer: Optimizer, factor: float) -> None:
    """Every parameter group runs at base lr × its ``lr_mult`` × the schedule's factor."""
    base = optimizer.defaults["lr"]
    for group in optimizer.param_groups:
        group["lr"] = base * group.get("lr_mult", 1.0) * factor
