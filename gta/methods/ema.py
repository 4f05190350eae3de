"""Exponential moving averages: the teacher update (Eq. 12) and knowledge transmission (Eq. 9)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EMA:
    """Decay schedule. With ``ramp`` the decay is min(1 - 1/(k+1), alpha) at the k-th update, so the
    first update is a copy and the average only becomes slow once the source has moved away from
    its random or warm-up state."""

    alpha: float = 0.99
    ramp: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"ema.alpha must lie in [0, 1], got {self.alpha}")

    def decay(self, k: int) -> float:
        return min(1.0 - 1.0 / (k + 1), self.alpha) if self.ramp else self.alpha


@torch.no_grad()
def ema_(target: Sequence[torch.Tensor], source: Sequence[torch.Tensor], decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, as one fused multi-tensor operation."""
    target, source = list(target), list(source)
    if len(target) != len(source):
        raise ValueError(f"EMA over {len(target)} target and {len(source)} source tensors")
    if target:
        torch._foreach_lerp_(target, source, 1.0 - decay)


@torch.no_grad()
def ema_model_(target: nn.Module, source: nn.Module, decay: float) -> None:
    """EMA of a whole network: every parameter, and the BatchNorm running statistics too.

    Averaging the running mean/var keeps the teacher's normalisation consistent with its averaged
    weights without an extra forward pass; integer buffers (batch counters) are copied.
    """
    ema_(list(target.parameters()), list(source.parameters()), decay)
    floats = [(t, s) for t, s in zip(target.buffers(), source.buffers(), strict=True) if t.is_floating_point()]
    ema_([t for t, _ in floats], [s for _, s in floats], decay)
    for t, s in zip(target.buffers(), source.buffers(), strict=True):
        if not t.is_floating_point():
            t.copy_(s)
