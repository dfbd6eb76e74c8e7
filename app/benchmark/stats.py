"""Percentiles and least-squares growth with its confidence interval."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

# Two-sided 95% Student t quantiles for 1 to 30 degrees of freedom.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959964


def t95(degrees_of_freedom: int) -> float:
    """Return the two-sided 95% Student t quantile (the normal's 1.96 as
    degrees of freedom grow). Beyond the table, the first three terms of
    the quantile's series in 1/df are within 0.0001 of the exact value."""
    if degrees_of_freedom <= len(_T95):
        return _T95[max(degrees_of_freedom, 1) - 1]
    z = _Z975
    df = degrees_of_freedom
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear-interpolated percentile, as numpy's default method computes it."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Regression:
    """Ordinary least squares of y on x: slope, intercept and the slope's 95%
    confidence interval."""

    slope: float
    intercept: float
    slope_stderr: float
    ci95_low: float
    ci95_high: float
    r_squared: float
    samples: int
    # Memory sampled every few seconds follows the cycle's saw-tooth, so
    # neighbouring residuals are correlated and the plain interval above is
    # too narrow. The adjusted interval replaces n by the effective sample
    # size n (1 - r1) / (1 + r1), where r1 is the residuals' lag-1
    # autocorrelation. It is infinite below 3 effective samples.
    residual_lag1: float = 0.0
    effective_samples: float = 0.0
    adjusted_ci95_low: float = -math.inf
    adjusted_ci95_high: float = math.inf


def linear_regression(x: Sequence[float], y: Sequence[float]) -> Regression:
    """Fit y = intercept + slope * x.

    Raises:
        ValueError: fewer than two points, or all x equal.
    """
    n = len(x)
    if n != len(y):
        raise ValueError(f"x has {n} values but y has {len(y)}")
    if n < 2:
        raise ValueError(f"a regression needs at least 2 samples, got {n}")
    mean_x = sum(x) / n
    mean_y = sum(y) / n
    sxx = sum((xi - mean_x) ** 2 for xi in x)
    if sxx == 0:
        raise ValueError("all samples were taken at the same time")
    sxy = sum((xi - mean_x) * (yi - mean_y) for xi, yi in zip(x, y, strict=True))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    residuals = [yi - (intercept + slope * xi) for xi, yi in zip(x, y, strict=True)]
    sse = sum(r * r for r in residuals)
    syy = sum((yi - mean_y) ** 2 for yi in y)
    r_squared = 1.0 - sse / syy if syy > 0 else 1.0
    if n > 2:
        stderr = math.sqrt(sse / (n - 2) / sxx)
        margin = t95(n - 2) * stderr
    else:
        stderr = math.inf
        margin = math.inf
    lag1 = lag1_autocorrelation(residuals)
    effective = n * (1 - lag1) / (1 + lag1) if lag1 > 0 else float(n)
    if effective > 2:
        adjusted = t95(int(effective - 2)) * math.sqrt(sse / (effective - 2) / sxx)
    else:
        adjusted = math.inf
    return Regression(
        slope=slope,
        intercept=intercept,
        slope_stderr=stderr,
        ci95_low=slope - margin,
        ci95_high=slope + margin,
        r_squared=r_squared,
        samples=n,
        residual_lag1=lag1,
        effective_samples=effective,
        adjusted_ci95_low=slope - adjusted,
        adjusted_ci95_high=slope + adjusted,
    )


def lag1_autocorrelation(values: Sequence[float]) -> float:
    """Return the lag-1 autocorrelation of `values`, or 0 for fewer than 3
    values or constant ones."""
    n = len(values)
    if n < 3:
        return 0.0
    mean = sum(values) / n
    centred = [v - mean for v in values]
    denominator = sum(c * c for c in centred)
    if denominator == 0:
        return 0.0
    numerator = sum(a * b for a, b in itertools.pairwise(centred))
    return numerator / denominator
