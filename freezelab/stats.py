"""Repeats and their uncertainty: mean, standard deviation and a 95% confidence
interval (Student's t, for the small n that seeds give).

>>> s = summarize([0.70, 0.74, 0.72])
>>> (s.n, round(s.mean, 3), round(s.ci95_low, 3), round(s.ci95_high, 3))
(3, 0.72, 0.67, 0.77)
>>> summarize([0.8]).ci95_low is None
True
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


def t_quantile_975(degrees_of_freedom: int) -> float:
    """The 97.5% quantile of Student's t: the half-width factor of a 95% interval."""
    from scipy.stats import t

    return float(t.ppf(0.975, degrees_of_freedom))
