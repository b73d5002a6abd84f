"""Paired comparison of two perplexity results on the same windows: the one paired statistic.

    >>> from joules.evaluate.paired import paired_nll
    >>> d = paired_nll([10.0, 12.0, 11.0], [5, 5, 5], [9.9, 11.9, 10.95], [5, 5, 5])
    >>> round(d.delta_nll, 4), d.windows, round(d.ppl_ratio, 5)
    (0.0167, 3, 1.01681)
    >>> d = paired_difference(candidate, baseline)        # doctest: +SKIP

Two perplexities each with its own interval overlap long before the difference between them is
uncertain: windows that are hard for one model are hard for the other. Pairing the windows and
taking the interval of the *difference* of mean NLL (the same cluster standard error across
windows as a single result) is what decides whether a compressed model is worse, and by how much.

The interval is Student t with ``windows - 1`` degrees of freedom, not the normal 1.96: a
few windows (8 at the default 4,096 tokens) make 1.96 visibly optimistic. The tables (the bench
scripts), the sweep (:func:`joules.sweep.results.paired_increase`), ``joules recommend`` and the
report all take their paired perplexity intervals from :func:`paired_nll`, so one comparison
prints one interval everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from joules.errors import ConfigError
from joules.evaluate.results import PerplexityResult, weighted_mean_stderr
from joules.measure.stats import t_quantile_975


def t95(df: int) -> float:
    """Two-sided 95 % quantile of Student's t (NaN below 1 degree of freedom)."""
    return t_quantile_975(df) if df >= 1 else float("nan")


@dataclass(frozen=True)
class PairedDifference:
    """``candidate - baseline`` in mean NLL (nats/token) over the same scored tokens."""

    delta_nll: float
    delta_nll_stderr: float
    windows: int
    tokens: int

    @property
    def delta_nll_ci95(self) -> tuple[float, float]:
        """Student t interval, ``windows - 1`` degrees of freedom (windows are the samples)."""
        half = t95(self.windows - 1) * self.delta_nll_stderr
        return (self.delta_nll - half, self.delta_nll + half)

    @property
    def ppl_ratio(self) -> float:
        """candidate perplexity / baseline perplexity = exp(delta NLL)."""
        return math.exp(self.delta_nll)

    @property
    def ppl_ratio_ci95(self) -> tuple[float, float]:
        lo, hi = self.delta_nll_ci95
        return (math.exp(lo), math.exp(hi))

    @property
    def significant(self) -> bool:
        """True when the 95 % interval of the difference excludes zero."""
        lo, hi = self.delta_nll_ci95
        return lo > 0 or hi < 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            delta_nll_ci95=list(self.delta_nll_ci95),
            ppl_ratio=self.ppl_ratio,
            ppl_ratio_ci95=list(self.ppl_ratio_ci95),
            significant=self.significant,
        )
        return d


def paired_nll(
    nll: Sequence[float],
    tokens: Sequence[int],
    base_nll: Sequence[float],
    base_tokens: Sequence[int],
) -> PairedDifference:
    """The paired per-window difference of NLL sums ``nll - base_nll`` (``tokens`` scored per
    window); both must come from the same windows."""
    if not tokens or list(tokens) != list(base_tokens):
        raise ConfigError(
            "a paired perplexity comparison needs the same windows for both models (same text, "
            "limit, window, stride and BOS): evaluate both under one protocol"
        )
    diffs = [x - y for x, y in zip(nll, base_nll, strict=True)]
    mean, stderr = weighted_mean_stderr(diffs, list(tokens))
    return PairedDifference(mean, stderr, len(diffs), sum(tokens))


def paired_difference(candidate: PerplexityResult, baseline: PerplexityResult) -> PairedDifference:
    """:func:`paired_nll` of two perplexity results over the same windows."""
    return paired_nll(
        candidate.window_nll_sums,
        candidate.window_tokens,
        baseline.window_nll_sums,
        baseline.window_tokens,
    )
