"""Statistics behind the results: Wilson intervals and the across-window standard error."""

from __future__ import annotations

import math

import pytest

from joules.evaluate.results import weighted_mean_stderr, wilson_interval


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)  # never a zero-width interval
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_weighted_stderr_equals_plain_stderr_for_equal_windows():
    values = [1.0, 2.0, 4.0, 7.0]
    mean, se = weighted_mean_stderr([v * 10 for v in values], [10] * 4)
    sd = math.sqrt(sum((v - 3.5) ** 2 for v in values) / 3)
    assert mean == pytest.approx(3.5) and se == pytest.approx(sd / 2)
    assert math.isnan(weighted_mean_stderr([3.0], [2])[1])
