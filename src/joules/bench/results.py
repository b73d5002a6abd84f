"""Typed results of ``joules bench``: one :class:`BenchRow` per prompt length × batch size.

    >>> from joules.bench.results import PhaseEnergy
    >>> e = PhaseEnergy(energy_j=[2.0, 2.2, 2.1], tokens=64, method="estimated",
    ...                 uncertainty_j=0.6, duration_s=[1.0, 1.0, 1.0])
    >>> round(e.j_per_token, 6), round(e.avg_power_w, 3)
    (0.032813, 2.1)

Times are medians over repeats with a 95 % t interval of the mean across repeats (the interval
covers run-to-run noise). J/token divides the median energy of a phase by the tokens that phase
produced: prompt tokens for prefill, generated tokens after the first for decode.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from joules.measure.stats import Summary, summarize


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of ``values`` at ``q`` in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Interval:
    """Median of per-repeat values and the 95 % t interval of their mean."""

    median: float
    ci95_low: float
    ci95_high: float
    values: list[float]

    @classmethod
    def of(cls, values: list[float]) -> Interval:
        s: Summary = summarize(values)
        return cls(statistics.median(values), s.ci95_low, s.ci95_high, list(values))

    @property
    def relative_half_width(self) -> float:
        """Half the interval's width as a fraction of the median (0.05 = ±5 %)."""
        if not self.median:
            return float("nan")
        return (self.ci95_high - self.ci95_low) / 2 / self.median

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Interval:
        return cls(d["median"], d["ci95_low"], d["ci95_high"], list(d["values"]))


@dataclass
class PhaseEnergy:
    """Energy of one phase over the repeats (one meter window per phase per run)."""

    energy_j: list[float]  # per repeat
    tokens: int  # tokens the phase produced in one run (all sequences of the batch)
    method: str  # overall: the least direct domain's
    uncertainty_j: float  # the meter's own uncertainty of the median run
    duration_s: list[float] = field(default_factory=list)  # the windows' durations
    methods: dict[str, str] = field(default_factory=dict)  # per domain
    domains_j: dict[str, float] = field(default_factory=dict)  # median run, per domain
    net_energy_j: float | None = None  # median run minus idle, when a baseline is known
    timeline: dict[str, Any] | None = None  # PowerTimeline.to_dict() of the last repeat

    @property
    def median_j(self) -> float:
        return statistics.median(self.energy_j)

    @property
    def j_per_token(self) -> float:
        return self.median_j / self.tokens if self.tokens else float("nan")

    @property
    def avg_power_w(self) -> float:
        t = sum(self.duration_s)
        return sum(self.energy_j) / t if t > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["median_j"] = self.median_j
        d["j_per_token"] = self.j_per_token
        d["avg_power_w"] = self.avg_power_w
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhaseEnergy:
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in keys})


@dataclass
class BenchRow:
    """One prompt length × batch size: latency, throughput, memory, energy, speed of light."""

    prompt_len: int
    batch: int
    gen_len: int
    repeats: int
    ttft_s: Interval  # prefill time incl. the first token, per run
    tpot_s: Interval  # mean time per decode step, per run
    tpot_mean_s: float  # over every decode step of every run
    tpot_p50_s: float
    tpot_p90_s: float
    prefill_tok_s: float  # batch × prompt_len ÷ median TTFT
    decode_tok_s: float  # batch ÷ median TPOT
    peak_rss_bytes: int  # highest sampled RSS over the runs
    model_bytes: int
    kv_bytes: int  # K and V of the batch at prompt_len + gen_len positions
    prefill_energy: PhaseEnergy | None = None
    decode_energy: PhaseEnergy | None = None
    run_energy_j: list[float] = field(default_factory=list)  # outer window per run
    decode_sol_tok_s: float | None = None
    decode_sol_fraction: float | None = None
    prefill_sol_tok_s: float | None = None
    prefill_sol_fraction: float | None = None
    peak_cuda_bytes: int | None = None
    tokens: list[int] = field(default_factory=list)  # first sequence's tokens of the last run
    notes: list[str] = field(default_factory=list)  # what the runtime said (graph breaks...)

    @property
    def decode_j_per_token(self) -> float | None:
        return self.decode_energy.j_per_token if self.decode_energy else None

    @property
    def prefill_j_per_token(self) -> float | None:
        return self.prefill_energy.j_per_token if self.prefill_energy else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("ttft_s", "tpot_s"):
            d[k] = getattr(self, k).to_dict()
        for k in ("prefill_energy", "decode_energy"):
            v = getattr(self, k)
            d[k] = v.to_dict() if v else None
        d["prefill_j_per_token"] = self.prefill_j_per_token
        d["decode_j_per_token"] = self.decode_j_per_token
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchRow:
        keys = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in keys}
        kw["ttft_s"] = Interval.from_dict(d["ttft_s"])
        kw["tpot_s"] = Interval.from_dict(d["tpot_s"])
        for k in ("prefill_energy", "decode_energy"):
            kw[k] = PhaseEnergy.from_dict(d[k]) if d.get(k) else None
        return cls(**kw)


@dataclass
class BenchResult:
    """Every row of one ``joules bench`` run and what produced it."""

    model: str
    runtime: str
    compute_dtype: str
    config: dict[str, Any]  # BenchConfig.to_dict()
    rows: list[BenchRow]
    model_info: dict[str, Any]  # ModelInfo.to_dict()
    machine: dict[str, Any]  # system_info, CPU flags
    limits: dict[str, Any] | None  # MachineLimits.to_dict() used for the fractions
    cost: dict[str, Any]  # ModelCost.to_dict()
    linear_paths: dict[str, int]  # "kernel:<name>" / "emulated" / "dense" -> number of linears
    threads: int
    meter: list[dict[str, Any]] = field(default_factory=list)  # Meter.describe()
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [r.to_dict() for r in self.rows]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        keys = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in keys}
        kw["rows"] = [BenchRow.from_dict(r) for r in d["rows"]]
        return cls(**kw)
