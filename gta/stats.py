"""What a handful of seeds can tell: a mean with its Student-t interval, and a difference between two
methods paired by seed, called a tie when its interval contains 0.

Used by ``make compare`` (scripts/compare_methods.py) and ``python -m gta report``, so that a table of
seeds never prints a gain that its own runs cannot tell from noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: the interval every table prints
CONFIDENCE = 0.95


def t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` degrees of freedom: the finite sums of Abramowitz and
    Stegun 26.7.3 (odd df) and 26.7.4 (even df), exact for whole degrees of freedom."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    term = total = 1.0
    if df % 2:
        for k in range(1, (df - 1) // 2):
            term *= cos2 * 2 * k / (2 * k + 1)
            total += term
        series = math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0
        return 2 / math.pi * (theta + series)
    for k in range(1, df // 2):
        term *= cos2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| <= t) = confidence (2.776 for 95 % and 4 degrees of freedom), by bisection."""
    if not 0 < confidence < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < confidence < 1 and df >= 1, got {confidence}, {df}")
    low, high = 0.0, 1.0
    while t_two_sided(high, df) < confidence:
        low, high = high, 2 * high
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if t_two_sided(middle, df) < confidence else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class Estimate:
    """A mean over n seeds, their sample standard deviation and the mean's interval (NaN below 2 seeds)."""

    mean: float
    std: float
    n: int
    low: float
    high: float

    @property
    def has_interval(self) -> bool:
        return self.n > 1

    def excludes_zero(self) -> bool:
        return self.has_interval and (self.low > 0 or self.high < 0)


def estimate(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    if not values:
        raise ValueError("estimate needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Estimate(mean, math.nan, len(values), math.nan, math.nan)
    std = statistics.stdev(values)
    half = t_quantile(confidence, len(values) - 1) * std / math.sqrt(len(values))
    return Estimate(mean, std, len(values), mean - half, mean + half)


def paired(values: Mapping[str, float], baseline: Mapping[str, float],
           confidence: float = CONFIDENCE) -> Estimate | None:
    """The difference values - baseline over the seeds both have (each seed its own pair, so what a seed
    does to both methods cancels); None when they share no seed."""
    seeds = [s for s in values if s in baseline]
    if not seeds:
        return None
    return estimate([values[s] - baseline[s] for s in seeds], confidence)


def verdict(difference: Estimate) -> str:
    """gain or loss when the interval excludes 0, tie when it contains 0, and no interval below 2 pairs."""
    if not difference.has_interval:
        return "no interval"
    if not difference.excludes_zero():
        return "tie"
    return "gain" if difference.mean > 0 else "loss"


def format_estimate(e: Estimate) -> str:
    """``58.32 ± 0.81 [56.31, 60.33] (n=3)``: mean ± sample std [95 % interval of the mean] (n seeds)."""
    if not e.has_interval:
        return f"{e.mean:.2f} (n={e.n})"
    return f"{e.mean:.2f} ± {e.std:.2f} [{e.low:.2f}, {e.high:.2f}] (n={e.n})"


def format_difference(d: Estimate) -> str:
    """``tie +0.39 [-1.50, +2.28] (n=3)``: the verdict, the mean paired difference and its interval."""
    if not d.has_interval:
        return f"{d.mean:+.2f} (n={d.n}, no interval)"
    return f"{verdict(d)} {d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}] (n={d.n})"
