"""Statistics behind the results: Wilson intervals and the across-window standard error."""

from __future__ import annotations

import json
import math

import pytest

from joules.evaluate.results import (
    PerplexityProtocol,
    PerplexityResult,
    weighted_mean_stderr,
    wilson_interval,
)


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


def test_perplexity_result_round_trips_through_its_json_dict():
    proto = PerplexityProtocol(
        model="m", dataset="wikitext2", split="test", tokenizer="t", window=8, stride=8,
        add_bos=False, limit_tokens=16, stream_tokens=16, text_bytes=70, dtype="float32",
        batch_size=1,
    )  # fmt: skip
    r = PerplexityResult(proto, 3.1, 0.2, 14, 2, 60, 0.5, [20.0, 23.4], [7, 7])
    back = PerplexityResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r and back.perplexity == r.perplexity
