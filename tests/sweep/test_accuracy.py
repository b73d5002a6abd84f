"""Accuracy constrains a recommendation: hellaswag in a sweep, paired drop, --min-accuracy."""

from __future__ import annotations

import pytest

from joules.sweep import Store, run_sweep
from joules.sweep.analyze import (
    Constraints,
    candidates,
    pareto_front,
    parse_accuracy,
    parse_points,
    recommend,
)
from joules.sweep.results import paired_accuracy_drop
from joules.sweep.store import Metric, RunRow
from joules.testing.sweep import FakeStages

SPEC = """\
models = ["tiny"]
recipes = ["baseline", "round(bits=8)", "round(bits=2)"]

[eval]
tasks = ["wikitext2", "hellaswag"]
limit_tokens = 256
window = 64
limit = 12
"""


def test_a_sweep_with_hellaswag_pairs_each_run_with_its_baseline(tmp_path, make_spec):
    spec = make_spec(SPEC)
    db = tmp_path / "s.db"
    summary = run_sweep(spec, db, stages=FakeStages().stages(), versions={"t": "1"})
    assert summary.failed == 0, summary.failures
    with Store(db) as st:
        runs = {r.recipe: r for r in st.runs()}
    base = runs["baseline"]
    assert base.metric("accuracy_drop_pts").value == 0.0
    for recipe in ("round(bits=8)", "round(bits=2)"):
        r = runs[recipe]
        ev, bev = r.eval["hellaswag"], base.eval["hellaswag"]
        assert ev["items"] == bev["items"] and len(ev["items"]) == 12
        expect = (
            100
            * sum(b - a for a, b in zip(ev["item_correct"], bev["item_correct"], strict=True))
            / 12
        )
        drop = r.metric("accuracy_drop_pts")
        assert drop.value == pytest.approx(expect) and drop.lo <= drop.value <= drop.hi
        assert r.metric("acc_norm").value == pytest.approx(ev["result"]["acc_norm"])
    # the Pareto figure 'accuracy' is reachable: every run has it
    front = pareto_front(candidates(list(runs.values())), ["accuracy", "bytes"])
    assert front and runs["round(bits=2)"].key in {c.key for c in front}  # the smallest


def test_paired_drop_cancels_item_difficulty():
    d = paired_accuracy_drop([1, 0, 1, 1], [3, 5, 7, 9], [1, 1, 1, 1], [3, 5, 7, 9])
    assert d.pts == 25.0 and d.items == 4 and d.lo < 25.0 < d.hi
    with pytest.raises(Exception, match="same items"):
        paired_accuracy_drop([1], [1], [1], [2])


def _run(recipe, acc, drop, jpt):
    metrics = [
        Metric("acc_norm", acc[1], "", "measured", acc[0], acc[2]),
        Metric("accuracy_drop_pts", drop[1], "pt", "measured", drop[0], drop[2]),
        Metric("j_per_token", jpt, "J/tok", "estimated"),
        Metric("model_bytes", 100 * jpt, "B", "measured"),
    ]
    return RunRow(
        key=recipe, model="m", recipe=recipe, workload="w", config={}, versions={},
        status="done", error=None, attempts=1, wall_s=1.0, timings={}, eval=None, bench=None,
        predictions=None, manifest=None, metrics=metrics,
    )  # fmt: skip


RUNS = [
    _run("baseline", (0.40, 0.45, 0.50), (0.0, 0.0, 0.0), 1.0),
    _run("int8", (0.39, 0.44, 0.49), (-0.5, 0.5, 1.5), 0.6),
    _run("int4", (0.36, 0.41, 0.46), (2.5, 4.0, 5.5), 0.45),
    _run("int2", (0.20, 0.25, 0.30), (15.0, 20.0, 25.0), 0.3),
]


def test_max_accuracy_drop_uses_the_upper_end_of_the_paired_interval():
    assert recommend(RUNS, Constraints(), "energy").chosen.recipe == "int2"
    r = recommend(RUNS, Constraints(max_accuracy_drop_pts=2.0), "energy")
    assert r.chosen.recipe == "int8"
    status = {b["excluded"]: b["status"] for b in r.bound_by}
    assert status == {"m · int2": "violated", "m · int4": "violated"}
    r = recommend(RUNS, Constraints(max_accuracy_drop_pts=5.0), "energy")
    assert r.chosen.recipe == "int8"  # int4's interval straddles 5: undecided, not accepted
    assert {b["excluded"]: b["status"] for b in r.bound_by}["m · int4"] == "undecided"


def test_min_accuracy_uses_the_lower_end_of_the_interval():
    r = recommend(RUNS, Constraints(min_accuracy=0.37), "energy")
    assert r.chosen.recipe == "int8"
    assert {b["excluded"]: b["status"] for b in r.bound_by} == {
        "m · int2": "violated", "m · int4": "undecided",
    }  # fmt: skip
    assert any("acc_norm ≥ 0.37" in c for c in r.constraints)
    r = recommend(RUNS, Constraints(min_accuracy=0.6), "energy")
    assert r.chosen is None and r.closest is not None


def test_parse_accuracy_and_points():
    assert parse_accuracy("0.45") == 0.45 and parse_accuracy("45%") == pytest.approx(0.45)
    assert parse_points("1") == parse_points("1pt") == parse_points("1%") == 1.0
    with pytest.raises(Exception, match="not an accuracy"):
        parse_accuracy("45")
