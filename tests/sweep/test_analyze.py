"""Pareto fronts and recommendations over synthetic runs (figures set by hand)."""

from __future__ import annotations

import pytest

from joules.errors import ConfigError
from joules.sweep.analyze import (
    Constraints,
    candidates,
    pareto_front,
    parse_bytes,
    parse_percent,
    recommend,
)
from joules.sweep.store import Metric, RunRow


def run(
    recipe, inc, jpt, nbytes, tpot=10.0, workload="p128/g32/b1/eager", h100_jpt=None, status="done"
):
    lo, hi = inc
    metrics = [
        Metric("ppl_increase_pct", (lo + hi) / 2, "%", "measured", lo, hi),
        Metric("j_per_token", jpt, "J/tok", "estimated", 0.9 * jpt, 1.1 * jpt),
        Metric("model_bytes", nbytes, "B", "measured"),
        Metric("tpot_ms", tpot, "ms", "measured"),
    ]
    if h100_jpt is not None:
        metrics.append(Metric("j_per_token", h100_jpt, "J/tok", "predicted", hardware="h100"))
    return RunRow(
        key=recipe, model="m", recipe=recipe, workload=workload, config={}, versions={},
        status=status, error=None, attempts=1, wall_s=1.0, timings={}, eval=None, bench=None,
        predictions=None, manifest=None, metrics=metrics,
    )  # fmt: skip


RUNS = [
    run("baseline", (0.0, 0.0), 1.00, 540e6, tpot=80, h100_jpt=0.010),
    run("int8", (0.1, 0.5), 0.60, 280e6, tpot=45, h100_jpt=0.006),
    run("int4", (1.0, 1.8), 0.45, 160e6, tpot=35, h100_jpt=0.005),
    run("mxfp4", (6.0, 9.0), 0.40, 150e6, tpot=30, h100_jpt=0.004),
]


def test_chosen_bound_by_the_ppl_limit_and_what_was_given_up():
    r = recommend(RUNS, Constraints(max_ppl_increase_pct=2.0), "energy")
    assert r.chosen.recipe == "int4" and r.runner_up.recipe == "int8"
    assert [b["excluded"] for b in r.bound_by] == ["m · mxfp4"]
    assert r.bound_by[0]["flag"] == "--max-ppl-increase" and r.bound_by[0]["status"] == "violated"
    given = {g["figure"] for g in r.given_up}
    assert "ppl_increase" in given and "energy" not in given  # int8 is more accurate
    assert {c.recipe for c in r.pareto} == {"baseline", "int8", "int4", "mxfp4"}


def test_straddling_interval_is_undecided_and_not_accepted():
    r = recommend(RUNS, Constraints(max_ppl_increase_pct=1.5), "energy")
    assert r.chosen.recipe == "int8"
    statuses = {b["excluded"]: b["status"] for b in r.bound_by}
    assert statuses == {"m · int4": "undecided", "m · mxfp4": "violated"}


def test_several_constraints_and_objectives():
    c = Constraints(max_ppl_increase_pct=10.0, max_model_bytes=parse_bytes("200MB"), max_tpot_ms=33)
    r = recommend(RUNS, c, "bytes")
    assert r.chosen.recipe == "mxfp4" and r.runner_up is None
    r = recommend(RUNS, Constraints(max_ppl_increase_pct=10.0, max_tpot_ms=40), "latency")
    assert r.chosen.recipe == "mxfp4" and r.runner_up.recipe == "int4"


def test_nothing_meets_the_constraints_says_what_comes_closest():
    c = Constraints(max_ppl_increase_pct=0.2, max_model_bytes=parse_bytes("100MB"))
    r = recommend(RUNS, c, "energy")
    assert r.chosen is None and r.closest is not None
    # int4 misses bytes by 60 % and ppl by a lot; baseline misses bytes by 440 %...
    # the smallest total relative excess wins.
    excess = {x.recipe: x.violation for x in r.candidates}
    assert r.closest.recipe == min(excess, key=excess.get)
    assert not r.closest.feasible


def test_hardware_uses_predictions():
    r = recommend(RUNS, Constraints(max_ppl_increase_pct=2.0), "energy", hardware="h100")
    assert r.chosen.recipe == "int4"
    assert r.chosen.figures["j_per_token"].method == "predicted"
    assert r.chosen.figures["ppl_increase_pct"].method == "measured"  # hardware-free figure
    with pytest.raises(ConfigError, match="no prediction for hardware 'a100'"):
        recommend(RUNS, Constraints(), "energy", hardware="a100")


def test_workloads_must_be_chosen_when_several():
    runs = [*RUNS, run("int8", (0.1, 0.5), 0.3, 280e6, workload="p512/g32/b1/eager")]
    with pytest.raises(ConfigError, match="--workload"):
        recommend(runs, Constraints(), "energy")
    r = recommend(runs, Constraints(), "energy", workload="p512/g32/b1/eager")
    assert r.chosen.recipe == "int8" and len(r.candidates) == 1


def test_failed_runs_are_not_candidates_and_empty_store_errors():
    assert len(candidates([*RUNS, run("x", (0, 0), 0.01, 1, status="failed")])) == 4
    with pytest.raises(ConfigError, match="no finished run"):
        recommend([run("x", (0, 0), 1, 1, status="failed")], Constraints(), "energy")
    with pytest.raises(ConfigError, match="objective"):
        recommend(RUNS, Constraints(), "speed")


def test_pareto_front_drops_dominated():
    cands = candidates([*RUNS, run("bad", (3.0, 4.0), 0.7, 300e6)])
    front = {c.recipe for c in pareto_front(cands, ["ppl_increase", "energy"])}
    assert "bad" not in front and front == {"baseline", "int8", "int4", "mxfp4"}
    with pytest.raises(ConfigError, match="Pareto figure"):
        pareto_front(cands, ["vibes"])
    r = recommend(RUNS, Constraints(), "energy", pareto=["bytes", "latency"])
    assert r.pareto_figures == ["bytes", "latency"]
    assert {c.recipe for c in r.pareto} == {"mxfp4"}  # smallest and fastest
    # A prediction on another hardware as a figure of the front.
    front = pareto_front(cands, ["ppl_increase", "energy@h100"])
    assert {c.recipe for c in front} == {"baseline", "int8", "int4", "mxfp4"}
    assert "bad" not in {c.recipe for c in front}  # no h100 prediction: left out


@pytest.mark.parametrize(
    ("text", "value"), [("80MB", 80_000_000), ("1GB", 10**9), ("512MiB", 2**29), ("100", 100)]
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_errors_are_one_line():
    with pytest.raises(ConfigError, match="80MB"):
        parse_bytes("eighty")
    with pytest.raises(ConfigError, match="2%"):
        parse_percent("two")
    assert parse_percent("0.5%") == 0.5


def _synthetic(r: RunRow) -> RunRow:
    from dataclasses import replace

    from joules.models.info import SYNTHETIC_LABEL

    return replace(r, key="syn-" + r.key, model="syn", manifest={"synthetic": SYNTHETIC_LABEL})


def test_runs_on_synthetic_weights_are_never_ranked():
    from joules.models.info import SYNTHETIC_LABEL

    # the synthetic copies are better on every figure; the recommendation ignores them
    fake = [_synthetic(r) for r in RUNS]
    for r in fake:
        r.metrics = [Metric(m.name, m.value / 2, m.unit, m.method, m.lo, m.hi) for m in r.metrics]
    r = recommend(RUNS + fake, Constraints(max_ppl_increase_pct=2.0), "energy")
    assert r.chosen.recipe == "int4" and r.chosen.model == "m"
    assert all(c.model == "m" for c in r.candidates)
    assert [x["run"] for x in r.not_ranked] == [f"syn · {x.recipe}" for x in RUNS]
    assert {x["why"] for x in r.not_ranked} == {SYNTHETIC_LABEL}
    with pytest.raises(ConfigError, match=r"synthetic model .*ranks none"):
        recommend(fake, Constraints(), "energy")
