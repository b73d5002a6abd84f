"""`joules recommend --min-accuracy / --max-accuracy-drop` on a store with accuracy figures."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from joules.cli import app
from joules.sweep.store import Metric, Store

runner = CliRunner()

# recipe: (acc_norm [lo, value, hi], paired drop in points [lo, value, hi], J/token)
RUNS = {
    "baseline": ((0.40, 0.45, 0.50), (0.0, 0.0, 0.0), 1.0),
    "int8": ((0.39, 0.44, 0.49), (-0.5, 0.5, 1.5), 0.6),
    "int2": ((0.20, 0.25, 0.30), (15.0, 20.0, 25.0), 0.3),
}


def _store(path):
    with Store(path) as st:
        for recipe, (acc, drop, jpt) in RUNS.items():
            st.begin_run(recipe, "m", recipe, "w", {}, {})
            metrics = [
                Metric("acc_norm", acc[1], "", "measured", acc[0], acc[2]),
                Metric("accuracy_drop_pts", drop[1], "pt", "measured", drop[0], drop[2]),
                Metric("j_per_token", jpt, "J/tok", "estimated"),
            ]
            st.finish_run(recipe, wall_s=1, timings={}, eval=None, bench=None, predictions=None,
                          manifest=None, metrics=metrics)  # fmt: skip
    return path


def test_accuracy_constraints_bind_the_recommendation(tmp_path):
    db = str(_store(tmp_path / "s.db"))
    free = json.loads(runner.invoke(app, ["recommend", db, "--json"]).stdout)
    assert free["chosen"]["recipe"] == "int2"
    for flags in (["--max-accuracy-drop", "2"], ["--min-accuracy", "38%"]):
        r = runner.invoke(app, ["recommend", db, *flags])
        assert r.exit_code == 0, r.output
        assert "ship: m · int8" in r.stdout and f"{flags[0]} bound" in r.stdout
        assert "acc_norm drop" in r.stdout  # its column in the table of every run
        d = json.loads(runner.invoke(app, ["recommend", db, *flags, "--json"]).stdout)
        assert d["chosen"]["recipe"] == "int8"
    r = runner.invoke(app, ["recommend", db, "--pareto", "accuracy,energy", "--json"])
    assert {c["recipe"] for c in json.loads(r.stdout)["pareto"]} == {"baseline", "int8", "int2"}


def test_a_bad_accuracy_is_one_line(tmp_path):
    db = str(_store(tmp_path / "s.db"))
    r = runner.invoke(app, ["recommend", db, "--min-accuracy", "45"])
    assert r.exit_code == 2 and "not an accuracy" in r.output and "Traceback" not in r.output
