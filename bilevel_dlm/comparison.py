"""Seed statistics for experiments: Student-t intervals of a mean and of paired differences, and a verdict
that claims a difference only when the paired interval excludes zero.

Runs of two variants that share a seed share their initial weights and data order, so the per-seed
difference removes what the seed does to both; its t interval over seeds is the right width for
"variant A beats B", and usually much narrower than the two arms' own intervals.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["RULE", "Interval", "t_quantile", "mean_interval", "paired_difference", "verdict"]

RULE = ("per arm: mean over seeds with its 95% Student-t interval; per comparison: the mean of the per-seed "
        "differences (arm - reference, same seed = same initial weights and data order) with its 95% t interval; "
        "'better' / 'worse' only when that interval excludes 0, otherwise 'no difference detected'; a difference "
        "identical on every seed (an interval of width 0) is flagged as such")


def _central_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` degrees of freedom (the closed forms of Abramowitz &
    Stegun 26.7.3 and 26.7.4: finite sums in cos(theta), theta = atan(t / sqrt(df)))."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= cos2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + math.sin(theta) * total)
    term, total = 1.0, 0.0
    for k in range(1, df // 2 + 1):
        total += term
        term *= cos2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided critical value t with P(|T| <= t) = ``confidence`` (bisection to 1e-12)."""
    if not 0 < confidence < 1 or df < 1:
        raise ValueError(f"need 0 < confidence < 1 and df >= 1, got {confidence} and {df}")
    low, high = 0.0, 1.0
    while _central_probability(high, df) < confidence:
        high *= 2
    while high - low > 1e-12 * max(1.0, high):
        middle = (low + high) / 2
        low, high = (middle, high) if _central_probability(middle, df) < confidence else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds and its two-sided ``confidence`` interval [low, high]."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of ``values`` (one per seed) with its Student-t interval; needs at least 2 values."""
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ValueError(f"an interval needs at least 2 seeds, got {len(values)}; run more seeds")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"non-finite value among {values}; a run diverged, look at its log before comparing")
    mean = statistics.fmean(values)
    half = t_quantile(confidence, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values), confidence)


def paired_difference(values: Sequence[float], reference: Sequence[float], confidence: float = 0.95) -> Interval:
    """The interval of the mean per-seed difference ``values[i] - reference[i]`` (same seed at index i)."""
    if len(values) != len(reference):
        raise ValueError(f"paired seeds: {len(values)} values against {len(reference)} reference values")
    return mean_interval([v - r for v, r in zip(values, reference)], confidence)


def verdict(difference: Interval, lower_is_better: bool) -> str:
    """'better', 'worse' or 'no difference detected' under :data:`RULE`; a difference that is the same on every
    seed has an interval of width 0, and says so (there is no spread to test, e.g. one example in every seed)."""
    if difference.high < 0 or difference.low > 0:
        found = "better" if (difference.high < 0) == lower_is_better else "worse"
        return found if difference.high > difference.low else f"{found} (the same on every seed: no spread to test)"
    return "no difference detected"
