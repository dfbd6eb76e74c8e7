import math

import pytest

from app.benchmark.stats import linear_regression, percentile, t95


def test_regression_recovers_known_slope() -> None:
    minutes = [0, 1, 2, 3, 4, 5]
    rss = [100 + 0.5 * m for m in minutes]
    fit = linear_regression(minutes, rss)
    assert fit.slope == pytest.approx(0.5)
    assert fit.intercept == pytest.approx(100)
    assert fit.r_squared == pytest.approx(1.0)
    assert fit.ci95_low == pytest.approx(0.5)
    assert fit.ci95_high == pytest.approx(0.5)


def test_regression_interval_matches_hand_computation() -> None:
    x = [0.0, 1.0, 2.0, 3.0]
    y = [1.0, 3.0, 2.0, 4.0]
    fit = linear_regression(x, y)
    # By hand: slope = sxy/sxx = 4/5 = 0.8, residual SS = 1.8, df = 2,
    # stderr = sqrt(1.8/2/5) = 0.42426, t(0.975, 2) = 4.303.
    assert fit.slope == pytest.approx(0.8)
    assert fit.slope_stderr == pytest.approx(math.sqrt(0.18))
    assert fit.ci95_high - fit.slope == pytest.approx(4.303 * math.sqrt(0.18))


def test_regression_rejects_too_few_samples() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        linear_regression([1.0], [1.0])
    with pytest.raises(ValueError, match="same time"):
        linear_regression([1.0, 1.0], [1.0, 2.0])


def test_percentile_interpolates() -> None:
    assert percentile([1, 2, 3, 4], 0.5) == 2.5
    assert percentile([5], 0.99) == 5
    assert percentile(list(range(101)), 0.95) == 95


def test_autocorrelated_residuals_widen_the_interval() -> None:
    # A flat series with a slow saw-tooth, as memory sampled within cycles
    # looks: neighbouring residuals are alike, so the plain interval is too
    # narrow and the adjusted one must be wider.
    x = [i / 12 for i in range(240)]
    y = [100 + (i % 24) * 0.1 for i in range(240)]
    fit = linear_regression(x, y)
    assert fit.residual_lag1 > 0.7
    assert fit.effective_samples < fit.samples / 5
    plain = fit.ci95_high - fit.ci95_low
    adjusted = fit.adjusted_ci95_high - fit.adjusted_ci95_low
    assert adjusted > 2 * plain
    assert fit.adjusted_ci95_low < fit.slope < fit.adjusted_ci95_high


def test_uncorrelated_residuals_keep_the_plain_interval() -> None:
    # Alternating residuals have negative lag-1 correlation: no adjustment.
    x = [float(i) for i in range(10)]
    y = [2 * i + (1 if i % 2 else -1) for i in range(10)]
    fit = linear_regression(x, y)
    assert fit.residual_lag1 < 0
    assert fit.effective_samples == 10
    assert fit.adjusted_ci95_low == pytest.approx(fit.ci95_low)
    assert fit.adjusted_ci95_high == pytest.approx(fit.ci95_high)


@pytest.mark.parametrize(
    ("degrees_of_freedom", "quantile"),
    [(1, 12.706), (11, 2.201), (30, 2.042), (31, 2.0395), (40, 2.0211), (120, 1.9799)],
)
def test_t95_matches_student_table(degrees_of_freedom: int, quantile: float) -> None:
    # Beyond 30 degrees of freedom the quantile is still above the normal's
    # 1.96, so a fit of 31 to 40 samples has a wider interval than 1.96 gives.
    assert t95(degrees_of_freedom) == pytest.approx(quantile, abs=1e-4)
