"""One paired statistic: the tables, the sweep, recommend and the report print one interval."""

from __future__ import annotations

import math

import pytest

from joules.errors import ConfigError
from joules.evaluate.paired import PairedDifference, paired_difference, paired_nll, t95
from joules.evaluate.results import PerplexityProtocol, PerplexityResult
from joules.sweep.results import paired_increase

BASE = [20.0, 30.0, 25.0, 28.0, 22.0, 26.0, 31.0, 24.0]
MODEL = [20.4, 30.3, 25.6, 28.1, 22.5, 26.1, 31.6, 24.2]
TOKENS = [10] * 8


def test_the_interval_is_student_t_with_windows_minus_one_degrees_of_freedom() -> None:
    d = paired_nll(MODEL, TOKENS, BASE, TOKENS)
    lo, hi = d.delta_nll_ci95
    assert (hi - lo) / 2 == pytest.approx(t95(7) * d.delta_nll_stderr)
    assert t95(7) == 2.365  # not the normal 1.96: eight windows make it visibly optimistic
    assert d.ppl_ratio_ci95 == pytest.approx((math.exp(lo), math.exp(hi)))
    assert d.significant == (lo > 0)


def test_the_sweep_and_the_tables_print_the_same_interval() -> None:
    d = paired_nll(MODEL, TOKENS, BASE, TOKENS)
    inc = paired_increase(MODEL, TOKENS, BASE, TOKENS)
    assert inc.delta_nll == d.delta_nll and inc.delta_nll_stderr == d.delta_nll_stderr
    assert inc.lo == pytest.approx(100 * (d.ppl_ratio_ci95[0] - 1))
    assert inc.hi == pytest.approx(100 * (d.ppl_ratio_ci95[1] - 1))

    def result(sums: list[float]) -> PerplexityResult:
        proto = PerplexityProtocol(
            model="m",
            dataset="wikitext2",
            split="test",
            tokenizer="t",
            window=10,
            stride=10,
            add_bos=False,
            limit_tokens=None,
            stream_tokens=80,
            text_bytes=400,
            dtype="float32",
            batch_size=1,
        )
        return PerplexityResult(
            proto, sum(sums) / 80, 0.0, 80, 8, 400, 0.0, window_nll_sums=sums, window_tokens=TOKENS
        )

    assert paired_difference(result(MODEL), result(BASE)) == d


def test_a_stored_difference_re_derives_its_interval() -> None:
    d = paired_nll(MODEL, TOKENS, BASE, TOKENS)
    again = PairedDifference(d.delta_nll, d.delta_nll_stderr, d.windows, d.tokens)
    assert again.to_dict() == d.to_dict()


def test_different_windows_are_refused() -> None:
    with pytest.raises(ConfigError, match="same windows"):
        paired_nll([1.0, 2.0], [5, 5], [1.0, 2.0], [5, 6])
    with pytest.raises(ConfigError, match="same windows"):
        paired_increase([], [], [], [])
