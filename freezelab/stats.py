"""Repeats and their uncertainty: mean, standard deviation and a 95% confidence
interval (Student's t, for the small n that seeds give).

>>> s = summarize([0.70, 0.74, 0.72])
>>> (s.n, round(s.mean, 3), round(s.ci95_low, 3), round(s.ci95_high, 3))
(3, 0.72, 0.67, 0.77)
>>> summarize([0.8]).ci95_low is None
True
>>> d = difference([0.80, 0.82, 0.81], [0.70, 0.74, 0.72])
>>> round(d.delta, 3), d.settled
(0.09, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float | None  # sample standard deviation (n - 1); None for one value
    ci95_low: float | None
    ci95_high: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        raise ValueError("no values to summarize")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Summary(1, mean, None, None, None)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def with_interval(mean: float, low: float | None, high: float | None, n: int) -> str:
    """A mean and its 95% interval as freezelab writes them.

    >>> with_interval(0.81, 0.7852, 0.8348, 3), with_interval(0.81, None, None, 1)
    ('0.8100 ± 0.0248 (95% interval, n=3)', '0.8100 (n=1, no interval)')
    """
    if low is None or high is None:
        return f"{mean:.4f} (n={n}, no interval)"
    return f"{mean:.4f} ± {(high - low) / 2:.4f} (95% interval, n={n})"


def t_quantile_975(degrees_of_freedom: int) -> float:
    """The 97.5% quantile of Student's t: the half-width factor of a 95% interval."""
    return _t_ppf_975(degrees_of_freedom)


@dataclass(frozen=True)
class Difference:
    """``mean(a) - mean(b)`` with the 95% interval of that difference (Welch's t, no
    equal-variance assumption); no interval when either side has a single value."""

    delta: float
    ci95_low: float | None
    ci95_high: float | None

    @property
    def settled(self) -> bool | None:
        """True when the interval excludes 0, False when it holds 0, None without one."""
        if self.ci95_low is None or self.ci95_high is None:
            return None
        return self.ci95_low > 0 or self.ci95_high < 0


def difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    first, second = summarize(a), summarize(b)
    delta = first.mean - second.mean
    if first.std is None or second.std is None:
        return Difference(delta, None, None)
    va, vb = first.std**2 / first.n, second.std**2 / second.n
    if va + vb == 0:  # identical repeats on both sides: no spread to speak of
        return Difference(delta, delta, delta)
    dof = (va + vb) ** 2 / (va**2 / (first.n - 1) + vb**2 / (second.n - 1))
    half = _t_ppf_975(dof) * math.sqrt(va + vb)
    return Difference(delta, delta - half, delta + half)


def _t_ppf_975(degrees_of_freedom: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, degrees_of_freedom))
