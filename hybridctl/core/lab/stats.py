"""Seed-to-seed statistics of a metric: mean, spread, a 95% confidence interval of the mean (t distribution) and
Welch's t-test between two configurations. scipy is imported only when there is a spread to measure.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


CONFIDENCE = 0.95
ALPHA = 0.05  # a difference from the best with p below this is called "worse"


@dataclass
class Spread:
    """One configuration's values over its seeds (std, CI: None for a single run, which has no spread)."""

    n: int
    mean: float
    std: float | None  # sample standard deviation (n - 1 in the denominator)
    ci_low: float | None
    ci_high: float | None
    min: float
    max: float

    @property
    def ci_half(self) -> float | None:
        return None if self.ci_low is None else (self.ci_high - self.ci_low) / 2


def spread(values: list[float]) -> Spread:
    if not values:
        raise ValueError("spread of no values")
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return Spread(n, mean, None, None, None, min(values), max(values))
    from scipy import stats  # loaded only when some configuration has several seeds

    std = statistics.stdev(values)
    if std == 0:  # every seed gave the same value: the interval is that value (scipy would answer NaN)
        low = high = mean
    else:
        low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=std / math.sqrt(n))
    return Spread(n, mean, std, float(low), float(high), min(values), max(values))


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances) that a and b have the same mean; None when either
    side has fewer than two values (no spread, nothing to test)."""
    if len(a) < 2 or len(b) < 2:
        return None
    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        # No noise on either side (deterministic runs): any difference is real, none is none. scipy says NaN.
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    from scipy import stats

    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)
