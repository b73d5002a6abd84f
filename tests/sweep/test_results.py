"""Paired perplexity increase arithmetic and the method labels of every figure."""

from __future__ import annotations

import math

import pytest

from joules.errors import ConfigError
from joules.evaluate.paired import t95
from joules.sweep.results import extract_metrics, paired_increase


def test_paired_increase_by_hand():
    base = [20.0, 30.0, 25.0, 28.0]
    model = [20.4, 30.3, 25.6, 28.1]
    tokens = [10, 10, 10, 10]
    inc = paired_increase(model, tokens, base, tokens)
    d = [m - b for m, b in zip(model, base, strict=True)]
    mean = sum(d) / 40
    se = math.sqrt(4 / 3 * sum((x - 10 * mean) ** 2 for x in d)) / 40
    assert inc.delta_nll == pytest.approx(mean)
    assert inc.delta_nll_stderr == pytest.approx(se)
    assert inc.pct == pytest.approx(100 * math.expm1(mean))
    assert inc.hi == pytest.approx(100 * math.expm1(mean + 3.182 * se))
    assert inc.lo < inc.pct < inc.hi and inc.windows == 4


def test_pairing_cancels_window_variation():
    # The text's windows differ wildly in difficulty; the model is uniformly 1 % worse in NLL.
    base = [10.0, 50.0, 20.0, 80.0, 35.0]
    model = [b * 1.01 for b in base]
    tokens = [10] * 5
    inc = paired_increase(model, tokens, base, tokens)
    assert inc.lo > 0  # decided: worse, although unpaired intervals would overlap heavily


def test_pairing_needs_the_same_windows():
    with pytest.raises(ConfigError, match="same windows"):
        paired_increase([1.0, 2.0], [5, 5], [1.0, 2.0], [5, 6])


def test_t_quantiles():
    assert t95(1) == 12.706 and t95(7) == 2.365 and t95(1000) == pytest.approx(1.96, abs=1e-2)


def _bench(paths):
    return {
        "rows": [
            {
                "ttft_s": {"median": 0.2, "ci95_low": 0.19, "ci95_high": 0.21, "values": []},
                "tpot_s": {"median": 0.01, "ci95_low": 0.009, "ci95_high": 0.011, "values": []},
                "decode_tok_s": 100.0,
                "peak_rss_bytes": 1000,
                "decode_energy": {"energy_j": [6.0, 6.2, 6.4], "tokens": 31, "method": "estimated",
                                  "uncertainty_j": 1.0, "j_per_token": 6.2 / 31},
            }
        ],
        "linear_paths": paths,
    }  # fmt: skip


def test_methods_of_every_figure():
    manifest = {"model_bytes": 100, "bits_per_weight": 4.5, "layers": {}}
    ev = {"wikitext2": {"result": {"perplexity": 12.0, "perplexity_ci95": [11.0, 13.0]},
                        "paired": {"pct": 1.0, "lo": 0.5, "hi": 1.5}}}  # fmt: skip
    preds = {"h100": {"tpot_s": 0.001, "decode_j_per_token": 0.01, "band": {"decode": 0.1},
                      "energy_band": {}, "method": "predicted"}}  # fmt: skip
    ms = {
        (m.name, m.hardware): m
        for m in extract_metrics(ev, _bench({"emulated": 3}), preds, manifest)
    }
    assert ms[("perplexity", "")].method == "measured" and ms[("perplexity", "")].lo == 11.0
    assert ms[("ppl_increase_pct", "")].hi == 1.5
    assert ms[("tpot_ms", "")].method == "measured; emulated kernels"
    assert ms[("tpot_ms", "")].value == pytest.approx(10.0) and ms[("tpot_ms", "")].hi == 11.0
    jpt = ms[("j_per_token", "")]
    assert jpt.method == "estimated; emulated kernels" and jpt.value == pytest.approx(0.2)
    # Interval: repeat spread (t, 3 repeats) and the meter's uncertainty in quadrature.
    rep = t95(2) * 0.2 / math.sqrt(3) / 31
    assert jpt.hi - jpt.value == pytest.approx(math.hypot(rep, 1.0 / 31))
    assert ms[("tpot_ms", "h100")].method == "predicted"
    assert ms[("tpot_ms", "h100")].hi == pytest.approx(1.1)
    assert ms[("j_per_token", "h100")].lo is None  # uncalibrated energy: no band claimed
    assert ms[("model_bytes", "")].value == 100
    real = extract_metrics(None, _bench({"kernel:int8": 3}), None, manifest)
    assert {m.name: m for m in real}["tpot_ms"].method == "measured"
