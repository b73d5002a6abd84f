"""Paired comparison of two perplexity results on the same windows.

    >>> from joules.evaluate.paired import paired_difference
    >>> d = paired_difference(candidate, baseline)        # doctest: +SKIP
    >>> d.ppl_ratio, d.ppl_ratio_ci95, d.significant       # doctest: +SKIP

Two perplexities each with its own interval overlap long before the difference between them is
uncertain: windows that are hard for one model are hard for the other. Pairing the windows and
taking the interval of the *difference* of mean NLL (the same cluster standard error across
windows as a single result) is what decides whether a compressed model is worse, and by how much.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from joules.errors import ConfigError
from joules.evaluate.results import Z95, PerplexityResult, weighted_mean_stderr


@dataclass(frozen=True)
class PairedDifference:
    """``candidate - baseline`` in mean NLL (nats/token) over the same scored tokens."""

    delta_nll: float
    delta_nll_stderr: float
    windows: int
    tokens: int

    @property
    def delta_nll_ci95(self) -> tuple[float, float]:
        half = Z95 * self.delta_nll_stderr
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


def paired_difference(candidate: PerplexityResult, baseline: PerplexityResult) -> PairedDifference:
    """The paired per-window NLL difference; both results must come from the same windows."""
    a, b = candidate, baseline
    if not a.window_tokens or a.window_tokens != b.window_tokens:
        raise ConfigError(
            "paired comparison needs two perplexity results over the same windows (same text, "
            "limit, window, stride and BOS): re-run both with one protocol"
        )
    diffs = [x - y for x, y in zip(a.window_nll_sums, b.window_nll_sums, strict=True)]
    mean, stderr = weighted_mean_stderr(diffs, a.window_tokens)
    return PairedDifference(mean, stderr, len(diffs), sum(a.window_tokens))
