"""Typed evaluation results, each carrying the full protocol that produced it, and their statistics.

    >>> from joules.evaluate.results import wilson_interval
    >>> lo, hi = wilson_interval(50, 100)
    >>> round(lo, 3), round(hi, 3)
    (0.404, 0.596)

Perplexities differ across tools mostly because the protocol differs (window, stride, BOS, which
tokens are scored, the text's preprocessing). Every result here therefore embeds a ``protocol``
dataclass with all of it, and ``to_dict()`` writes it out with the numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (better than the normal one near 0 or 1)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def weighted_mean_stderr(sums: list[float], counts: list[int]) -> tuple[float, float]:
    """Mean of per-token values grouped in windows, and its standard error across windows.

    ``sums[w]`` is the sum of the values in window ``w`` and ``counts[w]`` its number of tokens.
    The mean is the token-weighted mean; the standard error is the ratio-estimator (cluster)
    standard error, which treats windows, not tokens, as the independent samples: tokens inside
    one window are correlated, so a per-token standard error would be too optimistic.
    """
    n_tokens = sum(counts)
    if n_tokens == 0:
        return (float("nan"), float("nan"))
    mean = sum(sums) / n_tokens
    w = len(counts)
    if w < 2:
        return (mean, float("nan"))
    resid = sum((s - c * mean) ** 2 for s, c in zip(sums, counts, strict=True))
    return (mean, math.sqrt(w / (w - 1) * resid) / n_tokens)


@dataclass(frozen=True)
class PerplexityProtocol:
    """Everything that decides a perplexity number (two results compare only if these match)."""

    model: str
    dataset: str
    split: str | None
    tokenizer: str
    window: int
    stride: int
    add_bos: bool
    limit_tokens: int | None
    stream_tokens: int  # tokens in the (limited) stream that was evaluated
    text_bytes: int  # UTF-8 bytes of that stream's text
    dtype: str
    batch_size: int
    # How the numbers were computed (see joules.evaluate.scoring): the activation dtype of
    # compressed linears (pinned for evaluation, never a speed probe's choice), how every linear
    # ran, and how the model's dtype was chosen. "" in results written before they were recorded.
    activation_dtype: str = ""
    compute_path: str = ""
    dtype_choice: str = ""
    scoring: str = (
        "windows of `window` positions start every `stride` stream tokens; each window scores "
        "only tokens no earlier window scored; without BOS the first token of the stream (and "
        "of each window when stride == window) is context only"
    )


@dataclass(frozen=True)
class PerplexityResult:
    """Mean negative log-likelihood (nats/token) over the scored tokens and what follows from it."""

    protocol: PerplexityProtocol
    nll_mean: float
    nll_stderr: float
    tokens_scored: int
    windows: int
    scored_bytes: int
    duration_s: float
    # Per-window NLL sums and scored-token counts: what paired comparisons between two models
    # on the same windows need (see :mod:`joules.evaluate.paired`).
    window_nll_sums: list[float] = field(default_factory=list)
    window_tokens: list[int] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_mean)

    @property
    def perplexity_ci95(self) -> tuple[float, float]:
        """95 % interval of the perplexity: exp(mean NLL ± 1.96 standard errors across windows)."""
        half = Z95 * self.nll_stderr
        return (math.exp(self.nll_mean - half), math.exp(self.nll_mean + half))

    @property
    def bits_per_byte(self) -> float:
        """Total NLL in bits divided by the UTF-8 bytes of the scored tokens' text."""
        if self.scored_bytes <= 0:
            return float("nan")
        return self.nll_mean * self.tokens_scored / math.log(2) / self.scored_bytes

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_scored / self.duration_s if self.duration_s > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            perplexity=self.perplexity,
            perplexity_ci95=list(self.perplexity_ci95),
            bits_per_byte=self.bits_per_byte,
            tokens_per_s=self.tokens_per_s,
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerplexityResult:
        """The inverse of :meth:`to_dict` (derived fields are recomputed, not read)."""
        derived = {"perplexity", "perplexity_ci95", "bits_per_byte", "tokens_per_s", "protocol"}
        return cls(
            protocol=PerplexityProtocol(**d["protocol"]),
            **{k: v for k, v in d.items() if k not in derived},
        )


@dataclass(frozen=True)
class ChoiceProtocol:
    """How a multiple-choice evaluation was run."""

    model: str
    dataset: str
    items_total: int
    limit: int | None
    seed: int
    add_bos: bool
    dtype: str
    kv_reuse: bool
    text: str = ""  # where the text came from and how it was preprocessed
    # How the numbers were computed (see joules.evaluate.scoring): the activation dtype of
    # compressed linears (pinned for evaluation, never a speed probe's choice), how every linear
    # ran, and how the model's dtype was chosen. "" in results written before they were recorded.
    activation_dtype: str = ""
    compute_path: str = ""
    dtype_choice: str = ""
    scoring: str = (
        "score(ending) = sum of log p(token | context, earlier ending tokens) over the tokens of "
        "' ' + ending (lm-eval's target delimiter); acc = argmax score; acc_norm = argmax "
        "score / characters of the ending; acc_bytes = argmax score / UTF-8 bytes of the ending "
        "(delimiter not counted, first index on ties, as lm-eval); context and continuation "
        "tokenized as lm-eval does (context alone, then the continuation's tokens from the "
        "whole string)"
    )


@dataclass(frozen=True)
class ChoiceResult:
    """Accuracy and length-normalised accuracies (lm-eval's acc, acc_norm, acc_bytes), Wilson 95 %.

    ``items`` are the evaluated item indices and ``predictions*`` the ending each metric picked.
    """

    protocol: ChoiceProtocol
    n: int
    correct: int
    correct_norm: int
    duration_s: float
    correct_bytes: int = 0
    items: list[int] = field(default_factory=list, repr=False)
    predictions: list[int] = field(default_factory=list, repr=False)
    predictions_norm: list[int] = field(default_factory=list, repr=False)
    predictions_bytes: list[int] = field(default_factory=list, repr=False)

    @property
    def acc(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.n if self.n else float("nan")

    @property
    def acc_bytes(self) -> float:
        return self.correct_bytes / self.n if self.n else float("nan")

    @property
    def acc_ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    @property
    def acc_norm_ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct_norm, self.n)

    @property
    def acc_bytes_ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct_bytes, self.n)

    @property
    def items_per_s(self) -> float:
        return self.n / self.duration_s if self.duration_s > 0 else float("nan")

    def to_dict(self, predictions: bool = False) -> dict[str, Any]:
        """Figures and protocol; ``predictions=True`` adds the per-item indices and picks."""
        d = asdict(self)
        if not predictions:
            for key in ("items", "predictions", "predictions_norm", "predictions_bytes"):
                d.pop(key)
        d.update(
            acc=self.acc,
            acc_ci95=list(self.acc_ci95),
            acc_norm=self.acc_norm,
            acc_norm_ci95=list(self.acc_norm_ci95),
            acc_bytes=self.acc_bytes,
            acc_bytes_ci95=list(self.acc_bytes_ci95),
            items_per_s=self.items_per_s,
        )
        return d


@dataclass(frozen=True)
class DeviationProtocol:
    """What was compared with what, on which tokens, through which runtime.

    ``scored`` says which tokens count: ``"all"`` scores every token of non-overlapping windows
    of ``window`` tokens as ``perplexity.py`` plans them (BOS prepended when ``add_bos``);
    ``"second-half"`` is ``llama-perplexity``'s protocol: chunks of ``window`` tokens, the
    chunk's first token replaced by BOS when ``add_bos``, only the tokens of the second half
    scored (``window // 2 - 1`` per chunk). ``reference_store`` says how the reference's
    distributions were kept (exact, beside the model, or compactly as llama.cpp keeps them).
    """

    model: str
    reference: str
    transform: str | None  # e.g. "mxfp4 (emulated fake_quant on decoder linear weights)"
    dataset: str
    window: int
    limit_tokens: int | None
    add_bos: bool
    sqnr_modules: str
    kl: str = "KL(reference || model) per scored token, natural log (nats), as llama.cpp"
    # How the numbers were computed (see joules.evaluate.scoring): the activation dtype of
    # compressed linears (pinned for evaluation, never a speed probe's choice), how every linear
    # ran, and how the model's dtype was chosen. "" in results written before they were recorded.
    activation_dtype: str = ""
    compute_path: str = ""
    dtype_choice: str = ""
    reference_compute_path: str = ""
    scored: str = "all"
    runtime: str = "torch"  # what ran the model: torch or llamacpp
    reference_runtime: str = "torch"
    reference_store: str = "exact: the reference ran beside the model, float32 log-softmax"
    stream_tokens: int = 0  # tokens of the (limited) text stream, before any BOS
    interval: str = (
        "95 % Student t intervals with windows - 1 degrees of freedom over per-window sums "
        "(windows, not tokens, are the samples): the mean KL's, and the perplexity ratio's "
        "from the paired per-window NLL differences (joules.evaluate.paired)"
    )


@dataclass(frozen=True)
class LayerSQNR:
    """Output SQNR of one module: 10·log10(Σ ref² / Σ (model - ref)²) over all evaluated tokens.

    The error includes what upstream layers passed on: it is the deviation seen at that point
    of the network, not the layer's own quantization error in isolation.
    """

    name: str
    sqnr_db: float


@dataclass(frozen=True)
class DeviationResult:
    """Next-token distribution deviation of a model against its reference (llama.cpp style).

    ``kl_lo``/``kl_hi`` and ``ppl_ratio_lo``/``ppl_ratio_hi`` are 95 % intervals (see
    ``protocol.interval``); the per-window lists (same windows for both models) are what paired
    comparisons need. Results written before they were recorded read back with NaN intervals
    and empty lists.
    """

    protocol: DeviationProtocol
    tokens_scored: int
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    kl_stderr: float
    top1_agreement: float  # fraction of tokens whose argmax agrees ("Same top p" in llama.cpp)
    nll_model: float
    nll_reference: float
    layers: list[LayerSQNR]
    duration_s: float
    kl_lo: float = math.nan
    kl_hi: float = math.nan
    ppl_ratio_lo: float = math.nan
    ppl_ratio_hi: float = math.nan
    window_tokens: list[int] = field(default_factory=list)
    window_kl_sums: list[float] = field(default_factory=list)
    window_nll_sums: list[float] = field(default_factory=list)  # the model's
    window_nll_reference_sums: list[float] = field(default_factory=list)

    @property
    def perplexity_model(self) -> float:
        return math.exp(self.nll_model)

    @property
    def perplexity_reference(self) -> float:
        return math.exp(self.nll_reference)

    @property
    def perplexity_ratio(self) -> float:
        return math.exp(self.nll_model - self.nll_reference)

    @property
    def windows(self) -> int:
        return len(self.window_tokens)

    def worst_layers(self, k: int = 5) -> list[LayerSQNR]:
        """The ``k`` modules with the lowest SQNR (where the model deviates most)."""
        compared = [s for s in self.layers if not math.isnan(s.sqnr_db)]
        return sorted(compared, key=lambda s: s.sqnr_db)[:k]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            perplexity_model=self.perplexity_model,
            perplexity_reference=self.perplexity_reference,
            perplexity_ratio=self.perplexity_ratio,
            ppl_ratio=self.perplexity_ratio,
            top1_agreement_pct=100 * self.top1_agreement,
            windows=self.windows,
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviationResult:
        """The inverse of :meth:`to_dict` (derived fields are recomputed, not read)."""
        derived = {
            "perplexity_model",
            "perplexity_reference",
            "perplexity_ratio",
            "ppl_ratio",
            "top1_agreement_pct",
            "windows",
            "protocol",
            "layers",
        }
        return cls(
            protocol=DeviationProtocol(**d["protocol"]),
            layers=[LayerSQNR(**x) for x in d.get("layers", [])],
            **{k: v for k, v in d.items() if k not in derived},
        )
