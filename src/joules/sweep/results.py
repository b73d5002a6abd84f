"""Figures of a run: the paired perplexity increase and every metric with method and interval.

    >>> from joules.sweep.results import paired_increase
    >>> inc = paired_increase([10.0, 12.0, 11.0], [5, 5, 5], [9.9, 11.9, 10.95], [5, 5, 5])
    >>> round(inc.pct, 3), inc.windows
    (1.681, 3)

The perplexity increase of a compressed model is decided on the *paired* per-window difference
against the same model's baseline under the same protocol (same text, windows, tokenizer): both
see exactly the same windows, so the window-to-window variation of the text cancels and the
interval is far narrower than comparing two independent perplexity intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from joules.errors import ConfigError
from joules.measure.stats import summarize
from joules.serialize import to_jsonable
from joules.sweep.store import Metric

jsonable = to_jsonable  # one rule for the CLI, the store and exports


@dataclass(frozen=True)
class PairedIncrease:
    """Perplexity increase in percent against the baseline, with a 95 % interval across windows."""

    pct: float
    lo: float
    hi: float
    delta_nll: float  # mean NLL difference, nats per token
    delta_nll_stderr: float
    windows: int
    rule: str = (
        "paired per-window difference of NLL sums (model - baseline) over the same windows; "
        "ratio estimator across windows, Student t with windows - 1 degrees of freedom; "
        "increase = exp(delta mean NLL) - 1"
    )


def paired_increase(
    nll: Sequence[float],
    tokens: Sequence[int],
    base_nll: Sequence[float],
    base_tokens: Sequence[int],
) -> PairedIncrease:
    """Paired perplexity increase of a model over its baseline on the same windows: the
    statistic of :func:`joules.evaluate.paired.paired_nll` (Student t), as a percentage."""
    # lazy: the joules.evaluate package imports torch; recommend and report read this module
    # and stay torch-free (tests/cli/test_lazy_imports.py)
    from joules.evaluate.paired import paired_nll

    d = paired_nll(nll, tokens, base_nll, base_tokens)
    lo, hi = d.delta_nll_ci95
    return PairedIncrease(
        pct=100 * math.expm1(d.delta_nll),
        lo=100 * math.expm1(lo),
        hi=100 * math.expm1(hi),
        delta_nll=d.delta_nll,
        delta_nll_stderr=d.delta_nll_stderr,
        windows=d.windows,
    )


@dataclass(frozen=True)
class PairedAccuracyDrop:
    """Accuracy drop (baseline - model) in percentage points on the same items, 95 % interval."""

    pts: float
    lo: float
    hi: float
    items: int
    metric: str = "acc_norm"
    rule: str = (
        "paired per-item difference of correctness (baseline - model) over the same items; "
        "mean with a Student t interval, items - 1 degrees of freedom"
    )


def paired_accuracy_drop(
    correct: Sequence[int],
    items: Sequence[int],
    base_correct: Sequence[int],
    base_items: Sequence[int],
) -> PairedAccuracyDrop:
    """Paired accuracy drop of a model against its baseline on the same multiple-choice items.

    Both models answer the same items, so the items' difficulty cancels: only the items where
    they disagree contribute, and the interval is far narrower than two independent ones."""
    if list(items) != list(base_items) or not items:
        raise ConfigError(
            "a paired accuracy drop needs the same items for the model and its baseline: "
            "evaluate both under the same protocol"
        )
    d = [float(b) - float(a) for a, b in zip(correct, base_correct, strict=True)]
    mean = sum(d) / len(d)
    half = summarize(d).ci95_half_width if len(d) >= 2 else float("nan")
    return PairedAccuracyDrop(
        pts=100 * mean, lo=100 * (mean - half), hi=100 * (mean + half), items=len(d)
    )


def _interval(v: Any) -> tuple[float | None, float | None]:
    if isinstance(v, list | tuple) and len(v) == 2:
        return (v[0], v[1])
    if isinstance(v, dict):
        return (v.get("lo"), v.get("hi"))
    return (None, None)


def kernel_method(manifest: dict[str, Any] | None, bench: dict[str, Any] | None = None) -> str:
    """'emulated' when any compressed layer ran dequantize-then-matmul in the timed forwards
    (the bench's ``linear_paths``, else the one recorded after the bench), else 'measured'."""
    paths = (bench or {}).get("linear_paths") or (manifest or {}).get("linear_paths")
    if paths is not None:
        return "emulated" if paths.get("emulated", 0) > 0 else "measured"
    layers = (manifest or {}).get("layers") or {}
    kinds = {str(v.get("path", "")) for v in layers.values() if isinstance(v, dict)}
    return "emulated" if "emulated" in kinds else "measured"


def _with(method: str, kernels: str) -> str:
    return method if kernels != "emulated" else f"{method}; emulated kernels"


def extract_metrics(
    eval: dict[str, Any] | None,
    bench: dict[str, Any] | None,
    predictions: dict[str, Any] | None,
    manifest: dict[str, Any] | None,
) -> list[Metric]:
    """Every figure of a run as :class:`Metric` rows (what ``recommend`` and the report read).

    Quality is ``measured`` (an emulated format computes exactly the format's numbers); speed
    and memory are ``measured`` when the layers ran through real kernels and carry
    ``emulated kernels`` when they ran dequantize-then-matmul; energy carries the meter's method
    (``estimated`` on a machine without counters); predictions are ``predicted``.
    """
    out: list[Metric] = []
    kernels = kernel_method(manifest, bench)
    if manifest:
        if manifest.get("model_bytes") is not None:
            out.append(Metric("model_bytes", float(manifest["model_bytes"]), "B", "measured"))
        if manifest.get("bits_per_weight") is not None:
            out.append(
                Metric("bits_per_weight", float(manifest["bits_per_weight"]), "bit", "measured")
            )
    for task, ev in (eval or {}).items():
        res = ev.get("result", {})
        if task == "wikitext2" or "perplexity" in res:
            lo, hi = _interval(res.get("perplexity_ci95"))
            out.append(Metric("perplexity", res.get("perplexity"), "", "measured", lo, hi))
            out.append(Metric("bits_per_byte", res.get("bits_per_byte"), "bit/B", "measured"))
        paired = ev.get("paired")
        if paired:
            out.append(
                Metric(
                    "ppl_increase_pct", paired["pct"], "%", "measured", paired["lo"], paired["hi"]
                )
            )
        if "acc_norm" in res:
            lo, hi = _interval(res.get("acc_norm_ci95"))
            out.append(Metric("acc_norm", res["acc_norm"], "", "measured", lo, hi))
        if "kl_mean" in res:  # deviation: KL divergence from the baseline (llama.cpp's figures)
            out.extend(_kld_metrics(res))
        drop = ev.get("paired_accuracy")
        if drop:
            out.append(
                Metric("accuracy_drop_pts", drop["pts"], "pt", "measured", drop["lo"], drop["hi"])
            )
    if bench:
        out.extend(_bench_metrics(bench, kernels))
    for hw, pred in (predictions or {}).items():
        out.extend(_prediction_metrics(pred, hw))
    return [m for m in out if m.value is not None]


def _kld_metrics(res: dict[str, Any]) -> list[Metric]:
    """KL divergence from the baseline, per scored token, in nats: mean with its 95 % interval,
    median, p99, max; the share of tokens whose top token agrees; the perplexity ratio with its
    paired 95 % interval (``llama-perplexity --kl-divergence``'s figures)."""
    out = [
        Metric("kld_mean", res["kl_mean"], "nat", "measured", res.get("kl_lo"), res.get("kl_hi"))
    ]
    for name, key in (("kld_median", "kl_median"), ("kld_p99", "kl_p99"), ("kld_max", "kl_max")):
        if res.get(key) is not None:
            out.append(Metric(name, res[key], "nat", "measured"))
    if res.get("top1_agreement") is not None:
        out.append(Metric("same_top_pct", 100.0 * res["top1_agreement"], "%", "measured"))
    if res.get("ppl_ratio") is not None:
        out.append(
            Metric(
                "ppl_ratio",
                res["ppl_ratio"],
                "",
                "measured",
                res.get("ppl_ratio_lo"),
                res.get("ppl_ratio_hi"),
            )
        )
    return out


def _ms(v: Any) -> float | None:
    return None if v is None else 1000.0 * float(v)


def _interval_of(d: dict[str, Any] | None) -> tuple[float | None, float | None, float | None]:
    """(median, lo, hi) of a bench ``Interval.to_dict()``."""
    if not isinstance(d, dict):
        return (None, None, None)
    return (d.get("median"), d.get("ci95_low"), d.get("ci95_high"))


def _energy_per_token(e: dict[str, Any]) -> tuple[float, float | None, float | None]:
    """J/token of a bench phase, with a 95 % interval combining the spread across repeats
    (t interval of per-repeat J/token) and the meter's own uncertainty, in quadrature."""
    tokens = e.get("tokens") or 0
    jpt = float(e["j_per_token"])
    per = [x / tokens for x in e.get("energy_j", [])] if tokens else []
    half_rep = summarize(per).ci95_half_width if len(per) >= 2 else 0.0
    half_meter = float(e.get("uncertainty_j") or 0.0) / tokens if tokens else 0.0
    half = math.hypot(half_rep, half_meter)
    # Energy is never negative: a wide interval (few repeats) is cut at zero.
    return (jpt, max(0.0, jpt - half), jpt + half) if half > 0 else (jpt, None, None)


def _bench_metrics(b: dict[str, Any], kernels: str) -> list[Metric]:
    """Figures of ``BenchResult.to_dict()`` (joules.bench): its first row (a run benches one
    workload). Times are medians over repeats with the 95 % t interval of their mean."""
    rows = b.get("rows") or []
    if not rows:
        return []
    r = rows[0]
    out: list[Metric] = []
    speed = _with("measured", kernels)
    for name, key in (("ttft_ms", "ttft_s"), ("tpot_ms", "tpot_s")):
        med, lo, hi = _interval_of(r.get(key))
        if med is not None:
            out.append(Metric(name, _ms(med), "ms", speed, _ms(lo), _ms(hi)))
    if r.get("decode_tok_s") is not None:
        out.append(Metric("tokens_per_s", float(r["decode_tok_s"]), "tok/s", speed))
    if r.get("peak_rss_bytes") is not None:
        out.append(Metric("peak_rss_bytes", float(r["peak_rss_bytes"]), "B", speed))
    for name, key in (("j_per_token", "decode_energy"), ("prefill_j_per_token", "prefill_energy")):
        e = r.get(key)
        if e and e.get("j_per_token") is not None:
            v, lo, hi = _energy_per_token(e)
            method = _with(str(e.get("method") or "estimated"), kernels)
            out.append(Metric(name, v, "J/tok", method, lo, hi))
    return out


def _prediction_metrics(p: dict[str, Any], hw: str) -> list[Metric]:
    """Figures of ``Prediction.to_dict()`` (joules.predict), labelled ``predicted``; the
    interval is the calibration's band (none claimed when the hardware is uncalibrated)."""
    out: list[Metric] = []
    method = str(p.get("method") or "predicted")
    band, energy_band = p.get("band") or {}, p.get("energy_band") or {}
    for name, key, scale, unit, rel in (
        ("ttft_ms", "prefill_s", 1000.0, "ms", band.get("prefill")),
        ("tpot_ms", "tpot_s", 1000.0, "ms", band.get("decode")),
        ("j_per_token", "decode_j_per_token", 1.0, "J/tok", energy_band.get("decode")),
        ("tokens_per_s", "decode_tok_s", 1.0, "tok/s", None),
        ("peak_memory_bytes", "peak_memory_bytes", 1.0, "B", None),
    ):
        v = p.get(key)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue
        v = scale * float(v)
        lo, hi = (v * max(0.0, 1 - rel), v * (1 + rel)) if rel is not None else (None, None)
        out.append(Metric(name, v, unit, method, lo, hi, hardware=hw))
    return out
