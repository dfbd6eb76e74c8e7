import math

import pytest

from app.benchmark.stats import linear_regression, percentile


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
