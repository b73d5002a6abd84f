"""The report's answer: which file to ship, beside the runner-up and llama.cpp's file of the same
size, and why; and the rows of its candidate table.

    >>> from joules.report.answer import short_label, is_peer
    >>> short_label("llamacpp(ftype=Q4_0, imatrix=true)")
    'llama.cpp Q4_0 +imatrix'
    >>> short_label("awq(format=gguf-q4_0) | gptq(format=gguf-q4_0)")
    'awq(gguf-q4_0) | gptq(gguf-q4_0)'
    >>> is_peer("llamacpp(ftype=IQ4_NL, imatrix=false)"), is_peer("gptq(format=gguf-q4_0)")
    (True, False)

A run's *role*: ``llama.cpp peer`` (a recipe ``llamacpp(...)``: llama.cpp's own quantizer), else
``deployable`` (benched through the llamacpp runtime: the file a user ships), else ``research``
(the torch runtimes, eager or compiled: speed and energy of a runtime nobody deploys), or
``eval only`` (no bench). The recommendation is :func:`joules.sweep.analyze.recommend`'s, per
bench workload (a workload names its runtime), deployable workloads first. The peer "of the same
size" is the llama.cpp peer run whose model bytes are nearest the recommended run's; among peers
within 1 % of that distance, the one with the least mean KLD (else perplexity increase), so a
joules file is set beside llama.cpp's best file of its size, not its weakest.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from joules.errors import ConfigError
from joules.report.data import ReportData
from joules.sweep.analyze import OBJECTIVES, Constraints, Recommendation, human_bytes, recommend
from joules.sweep.store import Metric, RunRow

PEER_PREFIX = "llamacpp("
DEPLOY_RUNTIMES = ("llamacpp",)
RESEARCH_RUNTIMES = ("eager", "compiled")
_OBJECTIVE_WORDS = {"j_per_token": "J/token", "tpot_ms": "time per output token",
                    "model_bytes": "model bytes"}  # fmt: skip


def is_peer(recipe: str) -> bool:
    """A llama.cpp peer row: its recipe is ``llamacpp(ftype=..., imatrix=...)``."""
    return recipe.strip().startswith(PEER_PREFIX)


def is_baseline(r: RunRow) -> bool:
    return r.recipe.strip() == "baseline"


def runtime_of(r: RunRow) -> str | None:
    """The runtime a run was benched (or deployed) on: the manifest's ``deploy.runtime``, else
    the last part of its workload (``p64/g32/b1/llamacpp``), else None (eval only)."""
    deploy = (r.manifest or {}).get("deploy")
    if isinstance(deploy, dict) and deploy.get("runtime"):
        return str(deploy["runtime"])
    if r.workload:
        return r.workload.rsplit("/", 1)[-1]
    return None


def role_of(r: RunRow) -> str:
    """'llama.cpp peer', 'deployable', 'research' or 'eval only' (see the module docstring)."""
    if is_peer(r.recipe):
        return "llama.cpp peer"
    rt = runtime_of(r)
    if rt in DEPLOY_RUNTIMES:
        return "deployable"
    return "eval only" if rt is None else "research"


def gguf_of(r: RunRow) -> dict[str, Any] | None:
    """The run's GGUF file as the store recorded it ({path, size_bytes, sha256, types}), if any."""
    deploy = (r.manifest or {}).get("deploy")
    g = deploy.get("gguf") if isinstance(deploy, dict) else None
    return g if isinstance(g, dict) and g.get("path") else None


def ppl_ratio(r: RunRow) -> Metric | None:
    """Perplexity ratio to the baseline with its paired interval: the store's ``ppl_ratio``,
    else derived from ``ppl_increase_pct`` (ratio = 1 + increase / 100, exactly)."""
    m = r.metric("ppl_ratio")
    if m is not None and m.value is not None:
        return m
    inc = r.metric("ppl_increase_pct")
    if inc is None or inc.value is None:
        return None

    def f(x: float | None) -> float | None:
        return None if x is None else 1 + x / 100

    return Metric("ppl_ratio", f(inc.value), "", inc.method, f(inc.lo), f(inc.hi))


def figure(r: RunRow, name: str) -> Metric | None:
    """A figure of ``r`` on this machine (``ppl_ratio`` falls back as :func:`ppl_ratio` does)."""
    if name == "ppl_ratio":
        return ppl_ratio(r)
    m = r.metric(name)
    return m if m is not None and m.value is not None else None


def short_label(recipe: str) -> str:
    """A plot label for a recipe: ``format=`` dropped, a llama.cpp peer as its type."""
    text = recipe.strip()
    if is_peer(text):
        args = dict(re.findall(r"(\w+)\s*=\s*([^,\s)]+)", text))
        ftype = args.get("ftype") or args.get("type") or text[len(PEER_PREFIX) : -1]
        imatrix = str(args.get("imatrix", "false")).lower() in ("true", "1", "yes")
        return f"llama.cpp {ftype}" + (" +imatrix" if imatrix else "")
    return re.sub(r"\bformat\s*=\s*", "", text)


def quality_metric(runs: Sequence[RunRow]) -> str:
    """``kld_mean`` when any run has a mean KLD, else ``perplexity`` (what older stores have)."""
    return "kld_mean" if any(figure(r, "kld_mean") for r in runs) else "perplexity"


# -- numbers as the report prints them ------------------------------------------------------
def _n(v: float, digits: int = 3) -> str:
    if v == 0:
        return "0"
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 else f"{v:.2e}"


def format_value(name: str, v: float | None) -> str:
    """One number of figure ``name`` as text ('91.7 MB', '×1.081', '0.0830', '12.3 mJ')."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if name in ("model_bytes", "peak_rss_bytes", "size_bytes"):
        return human_bytes(v)
    if name == "ppl_ratio":
        return f"×{v:.3f}"
    if name == "ppl_increase_pct":
        return f"{v:+.2f} %"
    if name == "same_top_pct":
        return f"{v:.1f} %"
    if name == "bits_per_weight":
        return f"{v:.2f}"
    if name in ("j_per_token", "prefill_j_per_token"):
        return f"{v * 1000:.3g} mJ" if abs(v) < 1 else f"{v:.3g} J"
    if name == "tokens_per_s":
        return f"{v:.3g}"
    if name in ("tpot_ms", "ttft_ms"):
        return f"{v:.3g} ms"
    if name.startswith("kld"):
        return "0" if v == 0 else f"{v:.4f}" if abs(v) >= 1e-3 else f"{v:.2e}"
    return _n(v, 4)


def format_interval(name: str, m: Metric | None) -> str:
    """'[0.0790, 0.0870]', or '' when the figure has no interval (or a zero-width one, as the
    baseline's KLD against itself)."""
    if m is None or m.lo is None or m.hi is None or m.lo == m.hi == m.value:
        return ""
    lo, hi = format_value(name, m.lo), format_value(name, m.hi)
    if name == "ppl_ratio":
        lo, hi = lo.lstrip("×"), hi.lstrip("×")
    return f"[{lo}, {hi}]"


def format_metric(name: str, m: Metric | None, interval: bool = True) -> str:
    """'0.0830 [0.0790, 0.0870]' (the interval when known and asked for)."""
    if m is None:
        return "–"
    s = format_value(name, m.value)
    ci = format_interval(name, m) if interval else ""
    return f"{s} {ci}" if ci else s


LABELS = {
    "model_bytes": "size",
    "bits_per_weight": "bits/weight",
    "kld_mean": "mean KLD",
    "kld_median": "median KLD",
    "kld_p99": "p99 KLD",
    "kld_max": "max KLD",
    "same_top_pct": "same top token as the base",
    "ppl_ratio": "perplexity ratio",
    "perplexity": "perplexity",
    "ppl_increase_pct": "perplexity increase",
    "tokens_per_s": "decode tok/s",
    "tpot_ms": "time per output token",
    "j_per_token": "J/token (decode)",
    "peak_rss_bytes": "peak RSS",
    "acc_norm": "acc_norm",
    "accuracy_drop_pts": "acc_norm drop",
}


def method_tag(method: str) -> str:
    """The short mark of a non-measured figure: 'est.', 'emul.', 'pred.', '' when measured."""
    m = method.lower()
    tags = [t for w, t in (("predicted", "pred."), ("estimated", "est."), ("emulated", "emul."))
            if w in m]  # fmt: skip
    return " ".join(tags)


# -- the answer -------------------------------------------------------------------------------
@dataclass
class Answer:
    """The recommendation of one bench workload, with what it is set beside."""

    workload: str | None
    runtime: str | None
    deployable: bool
    objective: str  # the objective used ('bytes' when no run had the asked one's figure)
    asked_objective: str
    recommendation: Recommendation
    chosen: RunRow | None
    runner_up: RunRow | None
    closest: RunRow | None  # when nothing meets the constraints
    peer: RunRow | None
    peer_gap_bytes: float | None  # peer's model bytes minus the chosen's
    baseline: RunRow | None
    runs: list[RunRow] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return OBJECTIVES[self.objective]

    def why(self) -> list[str]:
        """The decision in sentences: the objective and constraints, which constraint excluded a
        run better on the objective, what the runner-up lost on (and what it is better at)."""
        rec = self.recommendation
        word = _OBJECTIVE_WORDS.get(self.metric, self.metric)
        rule = "; ".join(rec.constraints) or "no constraint"
        out = []
        if self.objective != self.asked_objective:
            out.append(
                f"No run here has a {OBJECTIVES[self.asked_objective]} figure: the objective "
                f"falls back to the least {word}."
            )
        n_ok = sum(c.feasible for c in rec.candidates if c.value(self.metric) is not None)
        if self.chosen is None:
            out.append(f"No run meets {rule}; the closest is shown with what it misses.")
            if rec.closest is not None:
                for chk in rec.closest.checks:
                    if chk.status != "met":
                        out.append(
                            f"{chk.flag} {chk.limit:g}: its "
                            f"{_check_figure(chk.figure)} is {chk.status}."
                        )
            return out
        out.append(
            f"Least {word} of the {n_ok} of {len(rec.candidates)} candidates that meet: {rule}."
        )
        by_flag: dict[tuple[str, float], list[str]] = {}
        for b in rec.bound_by:
            fig = Metric(**b["figure"]) if b["figure"] else None
            by_flag.setdefault((b["flag"], b["limit"]), []).append(
                f"{_label(b['excluded'])} ({_check_figure(fig)}, {b['status']})"
            )
        for (flag, limit), names in by_flag.items():
            more = f" and {len(names) - 4} more" if len(names) > 4 else ""
            out.append(
                f"Decided by {flag} {limit:g}: {len(names)} run(s) with less {word} miss it — "
                + "; ".join(names[:4])
                + more
                + "."
            )
        if not by_flag:
            out.append(f"Decided by the objective: no constraint excluded a run with less {word}.")
        if rec.runner_up is not None and self.runner_up is not None:
            a, b = rec.chosen.figures.get(self.metric), rec.runner_up.figures.get(self.metric)
            lost = ""
            if a is not None and b is not None and a.value is not None and b.value is not None:
                if a.value == b.value:
                    lost = f"the same {word}; a tie broken by its larger perplexity increase"
                else:
                    pct = 100 * (b.value - a.value) / abs(a.value) if a.value else math.inf
                    lost = (
                        f"{word}: {format_metric(self.metric, b)} against "
                        f"{format_metric(self.metric, a)} ({pct:+.1f} %)"
                    )
                    if None not in (a.lo, a.hi, b.lo, b.hi) and b.lo <= a.hi and a.lo <= b.hi:
                        lost += "; the 95 % intervals overlap, so the two are not told apart"
            out.append(f"The runner-up, {short_label(self.runner_up.recipe)}, lost on {lost}.")
            better = [
                f"{LABELS.get(g['metric'], g['metric'])} "
                f"{format_metric(g['metric'], Metric(**g['runner_up']), False)} vs "
                f"{format_metric(g['metric'], Metric(**g['chosen']), False)}"
                for g in rec.given_up
                if not (g["metric"] == "perplexity" and len(rec.given_up) > 1)
            ]
            if better:
                out.append("It is better on: " + "; ".join(better) + ".")
        elif self.runner_up is None:
            out.append("It is the only run that meets the constraints.")
        return out


def _label(label: str) -> str:
    """'model · recipe' -> the short label of its recipe."""
    return short_label(label.split(" · ", 1)[-1])


def _check_figure(m: Metric | None) -> str:
    if m is None:
        return "figure unknown"
    return f"{LABELS.get(m.name, m.name)} {format_metric(m.name, m)}"


def same_size_peer(runs: Sequence[RunRow], chosen: RunRow) -> tuple[RunRow | None, float | None]:
    """The llama.cpp peer of ``chosen``'s model and workload whose model bytes are nearest
    ``chosen``'s (see the module docstring), and its size gap in bytes (peer - chosen); (None,
    None) if none."""
    size = figure(chosen, "model_bytes")
    if size is None:
        return None, None
    peers = [
        (abs(m.value - size.value), r, m.value)
        for r in runs
        if r.key != chosen.key and r.model == chosen.model and r.workload == chosen.workload
        and is_peer(r.recipe)
        and (m := figure(r, "model_bytes")) is not None
    ]  # fmt: skip
    if not peers:
        return None, None
    nearest = min(d for d, _, _ in peers)
    close = [p for p in peers if p[0] <= nearest + 0.01 * max(size.value, 1.0)]

    def quality(r: RunRow) -> float:
        m = figure(r, "kld_mean") or figure(r, "ppl_increase_pct") or figure(r, "perplexity")
        return m.value if m is not None and m.value is not None else math.inf

    _gap, best, nbytes = min(close, key=lambda p: (quality(p[1]), p[0]))
    return best, nbytes - size.value


def _baseline(runs: Sequence[RunRow], model: str, workload: str | None) -> RunRow | None:
    bases = [r for r in runs if is_baseline(r) and r.model == model]
    return next((r for r in bases if r.workload == workload), bases[0] if bases else None)


def answers(
    data: ReportData, constraints: Constraints | None = None, objective: str = "energy"
) -> list[Answer]:
    """One :class:`Answer` per bench workload of the store (deployable ones first): the run
    ``recommend`` chooses for least ``objective`` under ``constraints`` (least model bytes when
    no run of the workload has the objective's figure)."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}: choose {', '.join(OBJECTIVES)}")
    constraints = constraints or Constraints()
    by_key = {r.key: r for r in data.done}
    out: list[Answer] = []
    for w in sorted({r.workload for r in data.done}, key=str):
        runs = [r for r in data.done if r.workload == w]
        for obj in dict.fromkeys((objective, "bytes")):
            try:
                rec = recommend(runs, constraints, obj, None, w, None)
            except ConfigError:
                continue
            chosen = by_key.get(rec.chosen.key) if rec.chosen else None
            runtime = w.rsplit("/", 1)[-1] if w else None
            anchor = chosen or (by_key.get(rec.closest.key) if rec.closest else None)
            peer, gap = same_size_peer(data.done, anchor) if anchor else (None, None)
            out.append(
                Answer(
                    workload=w,
                    runtime=runtime,
                    deployable=runtime in DEPLOY_RUNTIMES,
                    objective=obj,
                    asked_objective=objective,
                    recommendation=rec,
                    chosen=chosen,
                    runner_up=by_key.get(rec.runner_up.key) if rec.runner_up else None,
                    closest=by_key.get(rec.closest.key) if rec.closest else None,
                    peer=peer,
                    peer_gap_bytes=gap,
                    baseline=_baseline(data.done, anchor.model, w) if anchor else None,
                    runs=runs,
                )
            )
            break
    out.sort(key=lambda a: (not a.deployable, a.workload is None, str(a.workload)))
    return out
