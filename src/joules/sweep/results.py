"""Figures of a run: the paired perplexity increase and every metric with method and interval.

    >>> from joules.sweep.results import paired_increase
    >>> inc = paired_increase([10.0, 12.0, 11.0], [5, 5, 5], [9.9, 11.9, 10.95], [5, 5, 5])
    >>> round(inc.pct, 3), inc.windows
    (1.676, 3)

The perplexity increase of a compressed model is decided on the *paired* per-window difference
against the same model's baseline under the same protocol (same text, windows, tokenizer): both
see exactly the same windows, so the window-to-window variation of the text cancels and the
interval is far narrower than comparing two independent perplexity intervals.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joules.errors import ConfigError
from joules.sweep.store import Metric

# Two-sided 95 % Student t quantiles for 1..30 degrees of freedom (beyond: the normal 1.96).
# Few windows (8 at the default 4,096 tokens) make the normal quantile visibly optimistic.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t95(df: int) -> float:
    """Two-sided 95 % quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        return float("nan")
    return _T95[df - 1] if df <= len(_T95) else 1.959963984540054


def jsonable(obj: Any) -> Any:
    """Plain JSON values from dataclasses, tuples, paths, enums, tensors (NaN/inf → None)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return jsonable(obj.to_dict())
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "tolist"):
        return jsonable(obj.tolist())
    return obj


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
    """Paired perplexity increase of a model over its baseline on the same windows."""
    if list(tokens) != list(base_tokens) or not tokens:
        raise ConfigError(
            "paired perplexity needs the same windows for the model and its baseline: "
            "evaluate both under the same protocol"
        )
    d = [a - b for a, b in zip(nll, base_nll, strict=True)]
    n_tok = sum(tokens)
    mean = sum(d) / n_tok
    w = len(d)
    if w >= 2:
        resid = sum((s - c * mean) ** 2 for s, c in zip(d, tokens, strict=True))
        se = math.sqrt(w / (w - 1) * resid) / n_tok
    else:
        se = float("nan")
    half = t95(w - 1) * se
    return PairedIncrease(
        pct=100 * math.expm1(mean),
        lo=100 * math.expm1(mean - half),
        hi=100 * math.expm1(mean + half),
        delta_nll=mean,
        delta_nll_stderr=se,
        windows=w,
    )


def _get(d: Any, *paths: str) -> Any:
    """The first present value among dotted ``paths`` in nested dicts (None if none is)."""
    for p in paths:
        cur = d
        for part in p.split("."):
            if not isinstance(cur, dict) or part not in cur:
                cur = None
                break
            cur = cur[part]
        if cur is not None:
            return cur
    return None


def _interval(v: Any) -> tuple[float | None, float | None]:
    if isinstance(v, list | tuple) and len(v) == 2:
        return (v[0], v[1])
    if isinstance(v, dict):
        return (v.get("lo"), v.get("hi"))
    return (None, None)


def kernel_method(manifest: dict[str, Any] | None) -> str:
    """'emulated' when any compressed layer ran dequantize-then-matmul in the timed forwards
    (``linear_paths`` recorded after the bench), else 'measured'."""
    m = manifest or {}
    if m.get("linear_paths") is not None:
        return "emulated" if m["linear_paths"].get("emulated", 0) > 0 else "measured"
    layers = m.get("layers") or {}
    paths = {str(v.get("path", "")) for v in layers.values() if isinstance(v, dict)}
    return "emulated" if "emulated" in paths else "measured"


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
    kernels = kernel_method(manifest)
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
    if bench:
        out.extend(_bench_metrics(bench, kernels))
    for hw, pred in (predictions or {}).items():
        out.extend(_prediction_metrics(pred, hw))
    return [m for m in out if m.value is not None]


def _ms(v: Any) -> float | None:
    return None if v is None else 1000.0 * float(v)


def _bench_metrics(b: dict[str, Any], kernels: str) -> list[Metric]:
    """Figures of ``BenchResult.to_dict()`` (joules.bench)."""
    out: list[Metric] = []
    speed = _with("measured", kernels)
    ttft = _get(b, "ttft_s.median", "ttft_s")
    if ttft is not None:
        lo, hi = _interval(_get(b, "ttft_s.ci95", "ttft_ci95_s"))
        out.append(Metric("ttft_ms", _ms(ttft), "ms", speed, _ms(lo), _ms(hi)))
    tpot = _get(b, "tpot_s.median", "tpot_s.mean", "tpot_s")
    if tpot is not None:
        lo, hi = _interval(_get(b, "tpot_s.ci95", "tpot_ci95_s"))
        out.append(Metric("tpot_ms", _ms(tpot), "ms", speed, _ms(lo), _ms(hi)))
    tps = _get(b, "decode_tokens_per_s.median", "decode_tokens_per_s")
    if tps is not None:
        out.append(Metric("tokens_per_s", float(tps), "tok/s", speed))
    rss = _get(b, "peak_rss_bytes", "peak_memory_bytes")
    if rss is not None:
        out.append(Metric("peak_rss_bytes", float(rss), "B", speed))
    jpt = _get(b, "j_per_token.median", "j_per_token", "decode_j_per_token")
    if jpt is not None:
        lo, hi = _interval(_get(b, "j_per_token.ci95", "j_per_token_ci95"))
        method = str(_get(b, "energy_method", "method") or "estimated")
        out.append(Metric("j_per_token", float(jpt), "J/tok", _with(method, kernels), lo, hi))
    return out


def _prediction_metrics(p: dict[str, Any], hw: str) -> list[Metric]:
    """Figures of ``Prediction.to_dict()`` (joules.predict), labelled ``predicted``."""
    out: list[Metric] = []
    for name, paths, scale, unit in (
        ("ttft_ms", ("ttft_s", "prefill.latency_s"), 1000.0, "ms"),
        ("tpot_ms", ("tpot_s", "decode.latency_s"), 1000.0, "ms"),
        ("j_per_token", ("j_per_token", "decode.j_per_token"), 1.0, "J/tok"),
        ("tokens_per_s", ("decode_tokens_per_s", "decode.tokens_per_s"), 1.0, "tok/s"),
        ("peak_rss_bytes", ("peak_memory_bytes", "memory_bytes"), 1.0, "B"),
    ):
        v = _get(p, *paths)
        if v is None:
            continue
        band = _get(p, *(f"{q}_band" for q in paths), *(f"{q}_ci95" for q in paths))
        lo, hi = _interval(band)
        out.append(
            Metric(
                name,
                scale * float(v),
                unit,
                "predicted",
                None if lo is None else scale * lo,
                None if hi is None else scale * hi,
                hardware=hw,
            )
        )
    return out
