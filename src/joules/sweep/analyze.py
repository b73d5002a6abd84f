"""Pareto fronts and constraint-based recommendations over a sweep's store.

    >>> from joules.sweep.analyze import Constraints, parse_bytes, parse_percent
    >>> parse_bytes("80MB"), parse_bytes("1GiB"), parse_percent("2%")
    (80000000, 1073741824, 2.0)
    >>> Constraints(max_ppl_increase_pct=2.0).describe()
    ['perplexity increase ≤ 2 % (upper end of the paired 95 % interval)']

A candidate is one finished run (model, recipe, workload). Its figures come from the store's
``metrics`` table: measured on this machine (hardware ''), or predicted for ``--hardware``.

Decision rules (stated in every answer):

* perplexity increase: a candidate meets ``--max-ppl-increase`` when the *upper* end of the
  95 % interval of its paired per-window increase over the same model's baseline (same text,
  windows and tokenizer) is within the limit; a candidate whose interval straddles the limit is
  "undecided" and does not meet it (evaluate more tokens to decide);
* accuracy drop: a candidate meets ``--max-accuracy-drop`` when the upper end of the 95 %
  interval of its paired per-item drop of acc_norm (same items as the baseline) is within the
  limit (percentage points); ``--min-accuracy`` is met when the lower end of its acc_norm's
  95 % interval is at least the limit; an interval straddling the limit is "undecided";
* bytes, peak memory and TPOT: the point value (median of the bench repetitions, or the
  prediction) against the limit;
* the objective (energy = J/token, latency = TPOT, bytes = model bytes) is minimised; ties go
  to the smaller perplexity increase.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from joules.errors import ConfigError
from joules.sweep.store import Metric, RunRow

OBJECTIVES = {"energy": "j_per_token", "latency": "tpot_ms", "bytes": "model_bytes"}
# Figures a Pareto front may use, and whether smaller is better.
FIGURES = {
    "ppl": ("perplexity", True),
    "ppl_increase": ("ppl_increase_pct", True),
    "kld": ("kld_mean", True),
    "accuracy": ("acc_norm", False),
    "accuracy_drop": ("accuracy_drop_pts", True),
    "energy": ("j_per_token", True),
    "latency": ("tpot_ms", True),
    "ttft": ("ttft_ms", True),
    "bytes": ("model_bytes", True),
    "bits": ("bits_per_weight", True),
    "memory": ("peak_rss_bytes", True),
}
# Figures that do not depend on the hardware (always read from this machine's rows).
_HARDWARE_FREE = {
    "perplexity",
    "ppl_increase_pct",
    "ppl_ratio",
    "kld_mean",
    "kld_median",
    "kld_p99",
    "kld_max",
    "same_top_pct",
    "acc_norm",
    "accuracy_drop_pts",
    "model_bytes",
    "bits_per_weight",
    "bits_per_byte",
}

_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_bytes(text: str, what: str = "size") -> int:
    """'80MB' → 80,000,000; '1GiB' → 2**30; a bare number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{what} {text!r} is not a size: write e.g. 80MB, 512MiB or 1GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_accuracy(text: str, what: str = "--min-accuracy") -> float:
    """'0.45' or '45%' → 0.45 (a fraction, as acc_norm is)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", str(text))
    v = None if not m else float(m.group(1)) / (100 if m.group(2) else 1)
    if v is None or v > 1:
        raise ConfigError(f"{what} {text!r} is not an accuracy: write e.g. 0.45 or 45%")
    return v


def parse_points(text: str, what: str = "--max-accuracy-drop") -> float:
    """'1', '1pt' or '1%' → 1.0 (percentage points of accuracy, not a relative change)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|pts?|pp)?\s*", str(text))
    if not m:
        raise ConfigError(f"{what} {text!r} is not a number of points: write e.g. 1 or 0.5pt")
    return float(m.group(1))


def parse_percent(text: str, what: str = "--max-ppl-increase") -> float:
    """'2%' or '2' → 2.0 (percent)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%?\s*", str(text))
    if not m:
        raise ConfigError(f"{what} {text!r} is not a percentage: write e.g. 2% or 0.5%")
    return float(m.group(1))


@dataclass(frozen=True)
class Constraints:
    max_ppl_increase_pct: float | None = None
    max_model_bytes: int | None = None
    max_peak_rss_bytes: int | None = None
    max_tpot_ms: float | None = None
    min_accuracy: float | None = None  # acc_norm, a fraction
    max_accuracy_drop_pts: float | None = None  # percentage points of acc_norm
    max_kld: float | None = None  # mean KL divergence from the base model, nats per token

    def items(self) -> list[tuple[str, str, float]]:
        """(flag, metric name, limit) of each constraint set."""
        out = []
        for flag, metric, limit in (
            ("--max-ppl-increase", "ppl_increase_pct", self.max_ppl_increase_pct),
            ("--max-model-bytes", "model_bytes", self.max_model_bytes),
            ("--max-peak-rss", "peak_rss_bytes", self.max_peak_rss_bytes),
            ("--max-tpot-ms", "tpot_ms", self.max_tpot_ms),
            ("--min-accuracy", "acc_norm", self.min_accuracy),
            ("--max-accuracy-drop", "accuracy_drop_pts", self.max_accuracy_drop_pts),
            ("--max-kld", "kld_mean", self.max_kld),
        ):
            if limit is not None:
                out.append((flag, metric, float(limit)))
        return out

    def describe(self) -> list[str]:
        out = []
        for flag, _metric, limit in self.items():
            if flag == "--max-ppl-increase":
                out.append(
                    f"perplexity increase ≤ {limit:g} % (upper end of the paired 95 % interval)"
                )
            elif flag == "--max-kld":
                out.append(f"mean KLD ≤ {limit:g} nat (upper end of its 95 % interval)")
            elif flag == "--max-tpot-ms":
                out.append(f"TPOT ≤ {limit:g} ms")
            elif flag == "--min-accuracy":
                out.append(
                    f"acc_norm ≥ {limit:g} (lower end of its 95 % interval; add hellaswag to "
                    "[eval] tasks)"
                )
            elif flag == "--max-accuracy-drop":
                out.append(
                    f"acc_norm drop ≤ {limit:g} points (upper end of the paired 95 % interval)"
                )
            else:
                out.append(
                    f"{'model bytes' if 'model' in flag else 'peak RSS'} ≤ {human_bytes(limit)}"
                )
        return out


def human_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass
class Check:
    """One constraint on one candidate: 'met', 'violated', 'undecided' or 'unknown' (no figure)."""

    flag: str
    limit: float
    status: str
    figure: Metric | None
    excess: float = 0.0  # relative amount over the limit (0 when met)


@dataclass
class Candidate:
    key: str
    model: str
    recipe: str
    workload: str | None
    figures: dict[str, Metric]
    checks: list[Check] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list, repr=False)  # every hardware's

    @property
    def label(self) -> str:
        return f"{self.model} · {self.recipe}"

    @property
    def feasible(self) -> bool:
        return all(c.status == "met" for c in self.checks)

    def value(self, metric: str) -> float | None:
        m = self.figures.get(metric)
        return None if m is None else m.value

    @property
    def violation(self) -> float:
        """How far outside the constraints (sum of relative excesses; unknown counts as 1)."""
        return sum(c.excess if c.status != "unknown" else 1.0 for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "model": self.model,
            "recipe": self.recipe,
            "workload": self.workload,
            "figures": {k: vars(m) for k, m in self.figures.items()},
            "checks": [
                {"flag": c.flag, "limit": c.limit, "status": c.status, "excess": c.excess}
                for c in self.checks
            ],
            "feasible": self.feasible,
        }


def candidates(runs: Sequence[RunRow], hardware: str | None = None) -> list[Candidate]:
    """Finished runs with their figures for ``hardware`` (None / 'this-machine': measured here)."""
    hw = "" if hardware in (None, "", "this-machine") else hardware
    out = []
    for r in runs:
        if r.status != "done":
            continue
        figs: dict[str, Metric] = {}
        for m in r.metrics:
            if m.name in _HARDWARE_FREE:
                if m.hardware == "":
                    figs[m.name] = m
            elif m.hardware == hw:
                figs[m.name] = m
        out.append(Candidate(r.key, r.model, r.recipe, r.workload, figs, metrics=list(r.metrics)))
    return out


def _check(c: Candidate, flag: str, metric: str, limit: float) -> Check:
    m = c.figures.get(metric)
    if m is None and metric == "peak_rss_bytes":  # a prediction's peak memory on its hardware
        m = c.figures.get("peak_memory_bytes")
    if m is None or m.value is None:
        return Check(flag, limit, "unknown", m)
    scale = abs(limit) if limit else 1.0
    if metric == "acc_norm":  # a floor: the lower end of the interval decides
        lo = m.lo if m.lo is not None else m.value
        if lo >= limit:
            return Check(flag, limit, "met", m)
        status = "violated" if (m.hi if m.hi is not None else m.value) < limit else "undecided"
        return Check(flag, limit, status, m, (limit - lo) / max(scale, 1e-9))
    if metric in ("ppl_increase_pct", "accuracy_drop_pts", "kld_mean"):
        hi = m.hi if m.hi is not None else math.inf
        if hi <= limit:
            return Check(flag, limit, "met", m)
        status = "violated" if (m.lo if m.lo is not None else m.value) > limit else "undecided"
        return Check(
            flag, limit, status, m, (hi - limit) / max(scale, 1e-9) if math.isfinite(hi) else 1.0
        )
    if m.value <= limit:
        return Check(flag, limit, "met", m)
    return Check(flag, limit, "violated", m, (m.value - limit) / scale)


def pareto_fronts(
    cands: Sequence[Candidate], figures: Sequence[str]
) -> dict[tuple[str, str | None], list[Candidate]]:
    """The Pareto front of each (model, workload), never across them: a perplexity or a
    perplexity increase compares versions of one model, and J/token or TPOT one workload."""
    groups: dict[tuple[str, str | None], list[Candidate]] = {}
    for c in cands:
        groups.setdefault((c.model, c.workload), []).append(c)
    return {k: pareto_front(v, figures) for k, v in groups.items()}


def pareto_front(cands: Sequence[Candidate], figures: Sequence[str]) -> list[Candidate]:
    """Candidates no other candidate beats on every figure (``figures`` are keys of FIGURES,
    ``name@hardware`` for that hardware's prediction, e.g. ``latency@h100``); a candidate
    missing one of the figures is left out. The candidates should share a model and a
    workload (see :func:`pareto_fronts`)."""
    specs = []
    for f in figures:
        name, _, hw = f.partition("@")
        if name not in FIGURES:
            raise ConfigError(
                f"unknown Pareto figure {f!r}: choose from {', '.join(FIGURES)} "
                "(add @HARDWARE for a prediction, e.g. latency@h100)"
            )
        specs.append((*FIGURES[name], hw))

    def vec(c: Candidate) -> list[float] | None:
        out = []
        for metric, smaller, hw in specs:
            if hw:
                m = next((x for x in c.metrics if x.name == metric and x.hardware == hw), None)
                v = None if m is None else m.value
            else:
                v = c.value(metric)
            if v is None:
                return None
            out.append(v if smaller else -v)
        return out

    pts = [(c, v) for c in cands if (v := vec(c)) is not None]
    front = []
    for c, v in pts:
        dominated = any(
            all(a <= b for a, b in zip(w, v, strict=True))
            and any(a < b for a, b in zip(w, v, strict=True))
            for _, w in pts
        )
        if not dominated:
            front.append(c)
    return front


@dataclass
class Recommendation:
    objective: str
    metric: str
    hardware: str
    workload: str | None
    constraints: list[str]
    chosen: Candidate | None
    runner_up: Candidate | None
    bound_by: list[dict[str, Any]]  # constraints that excluded a candidate better on the objective
    given_up: list[dict[str, Any]]  # figures where the runner-up is better than the chosen one
    closest: Candidate | None  # when nothing meets the constraints
    pareto: list[Candidate]
    candidates: list[Candidate]
    rules: list[str]
    pareto_figures: list[str] = field(default_factory=list)
    # runs left out of the ranking, with why (synthetic weights: quality is meaningless)
    not_ranked: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def c(x: Candidate | None) -> Any:
            return None if x is None else x.to_dict()

        return {
            "objective": self.objective,
            "metric": self.metric,
            "hardware": self.hardware,
            "workload": self.workload,
            "constraints": self.constraints,
            "chosen": c(self.chosen),
            "runner_up": c(self.runner_up),
            "bound_by": self.bound_by,
            "given_up": self.given_up,
            "closest": c(self.closest),
            "pareto_figures": self.pareto_figures,
            "pareto": [x.to_dict() for x in self.pareto],
            "candidates": [x.to_dict() for x in self.candidates],
            "rules": self.rules,
            "not_ranked": self.not_ranked,
        }


RULES = [
    "perplexity increase: paired per-window difference against the same model's baseline under "
    "the same protocol; meets the limit when the upper end of its 95 % interval does",
    "accuracy drop: paired per-item difference of acc_norm against the same model's baseline "
    "on the same items; meets the limit when the upper end of its 95 % interval does; minimum "
    "accuracy: met when the lower end of acc_norm's 95 % interval is at least the limit",
    "bytes, peak memory, TPOT: point value (median of repetitions, or the prediction) against "
    "the limit",
    "Pareto front: per model and workload, never across them",
    "objective minimised; ties broken by the smaller perplexity increase",
    "runs on synthetic (random) weights are never ranked: their quality figures are "
    "meaningless; their time and memory figures stand",
]


def recommend(
    runs: Sequence[RunRow],
    constraints: Constraints,
    objective: str = "energy",
    hardware: str | None = None,
    workload: str | None = None,
    pareto: Sequence[str] | None = None,
) -> Recommendation:
    """Choose the finished run that best meets ``objective`` under ``constraints``.

    ``pareto`` names the figures of the Pareto front returned with the answer (keys of
    :data:`FIGURES`; default: perplexity increase and the objective)."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}: choose {', '.join(OBJECTIVES)}")
    metric = OBJECTIVES[objective]
    done = [r for r in runs if r.status == "done"]
    if not done:
        raise ConfigError("the store holds no finished run: run `joules sweep SPEC.toml` first")
    # random weights (joules.models.synthetic) measure time and memory only: never ranked
    synthetic = [r for r in done if r.synthetic]
    done = [r for r in done if not r.synthetic]
    if not done:
        raise ConfigError(
            f"every finished run is on a synthetic model ({synthetic[0].synthetic}): joules ranks "
            "none of them; sweep a real checkpoint for a recommendation"
        )
    workloads = sorted({r.workload for r in done if r.workload is not None})
    if workload is not None:
        if workload not in workloads:
            raise ConfigError(
                f"no run with workload {workload!r}: choose {', '.join(workloads) or 'none'}"
            )
        done = [r for r in done if r.workload == workload]
    elif len(workloads) > 1:
        raise ConfigError(
            f"the store holds several bench workloads: pass --workload, one of {', '.join(workloads)}"
        )
    hw_names = sorted({m.hardware for r in done for m in r.metrics if m.hardware})
    if hardware not in (None, "", "this-machine") and hardware not in hw_names:
        raise ConfigError(
            f"no prediction for hardware {hardware!r} in the store: choose "
            f"{', '.join(['this-machine', *hw_names])} (add it to [predict] hardware)"
        )
    cands = candidates(done, hardware)
    for c in cands:
        c.checks = [_check(c, flag, m, limit) for flag, m, limit in constraints.items()]

    def rank(c: Candidate) -> tuple[float, float]:
        v = c.value(metric)
        inc = c.value("ppl_increase_pct")
        return (v if v is not None else math.inf, inc if inc is not None else math.inf)

    with_objective = [c for c in cands if c.value(metric) is not None]
    if not with_objective:
        raise ConfigError(
            f"no finished run has a {metric} figure"
            + (" for that hardware" if hardware else "")
            + (": add a [bench] table to the spec" if objective != "bytes" else "")
        )
    feasible = sorted((c for c in with_objective if c.feasible), key=rank)
    chosen = feasible[0] if feasible else None
    runner_up = feasible[1] if len(feasible) > 1 else None
    bound_by: list[dict[str, Any]] = []
    given_up: list[dict[str, Any]] = []
    closest = None
    if chosen is not None:
        for c in sorted(with_objective, key=rank):
            if rank(c) >= rank(chosen):
                break
            for chk in c.checks:
                if chk.status != "met":
                    bound_by.append(
                        {
                            "flag": chk.flag,
                            "limit": chk.limit,
                            "excluded": c.label,
                            "status": chk.status,
                            "figure": None if chk.figure is None else vars(chk.figure),
                            "objective_value": c.value(metric),
                        }
                    )
        if runner_up is not None:
            for name, (m, smaller) in FIGURES.items():
                a, b = chosen.figures.get(m), runner_up.figures.get(m)
                if a is None or b is None or a.value is None or b.value is None:
                    continue
                if (b.value < a.value) if smaller else (b.value > a.value):
                    given_up.append(
                        {"figure": name, "metric": m, "chosen": vars(a), "runner_up": vars(b)}
                    )
    else:
        closest = min(with_objective, key=lambda c: (c.violation, rank(c)))
    pareto_figures = list(pareto or ["ppl_increase", objective])
    front = [c for f in pareto_fronts(cands, pareto_figures).values() for c in f]
    return Recommendation(
        objective=objective,
        metric=metric,
        hardware=hardware or "this-machine",
        workload=workload or (workloads[0] if workloads else None),
        constraints=constraints.describe(),
        chosen=chosen,
        runner_up=runner_up,
        bound_by=bound_by,
        given_up=given_up,
        closest=closest,
        pareto=front,
        candidates=cands,
        rules=RULES,
        pareto_figures=pareto_figures,
        not_ranked=[
            {"run": f"{r.model} · {r.recipe}", "why": str(r.synthetic)}
            for r in synthetic
            if workload is None or r.workload == workload
        ],
    )
