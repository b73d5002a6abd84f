"""`joules sweep` and `joules recommend` through the CLI, with the real stages on a tiny model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from joules.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def swept(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    spec = d / "spec.toml"
    spec.write_text(
        f'models = ["{tiny_dir}"]\n'
        'recipes = ["baseline", "rtn(format=int8-ch)", "rtn(format=int4-g32)"]\n'
        "[eval]\nlimit_tokens = 512\nwindow = 64\n"
        "[calibration]\nn = 4\nlength = 32\n"
    )
    store = d / "s.db"
    first = runner.invoke(app, ["sweep", str(spec), "--store", str(store), "--json"])
    return spec, store, first


def test_sweep_runs_then_skips(swept):
    spec, store, first = swept
    assert first.exit_code == 0, first.output
    s1 = json.loads(first.stdout)
    assert (s1["total"], s1["ran"], s1["failed"]) == (3, 3, 0)
    second = runner.invoke(app, ["sweep", str(spec), "--store", str(store)])
    assert second.exit_code == 0 and "already done" in second.stdout
    s2 = json.loads(
        runner.invoke(app, ["sweep", str(spec), "--store", str(store), "--json"]).stdout
    )
    assert (s2["ran"], s2["skipped"]) == (0, 3)


def test_recommend_answers_with_methods_and_intervals(swept):
    _, store, _ = swept
    r = runner.invoke(
        app, ["recommend", str(store), "--max-ppl-increase", "50%", "--objective", "bytes"]
    )
    assert r.exit_code == 0, r.output
    assert "ship:" in r.stdout and "rtn(format=int4-g32)" in r.stdout and "(measured)" in r.stdout
    d = json.loads(
        runner.invoke(
            app,
            [
                "recommend",
                str(store),
                "--max-ppl-increase",
                "50%",
                "--objective",
                "bytes",
                "--json",
            ],
        ).stdout
    )
    assert d["chosen"]["recipe"] == "rtn(format=int4-g32)"
    assert d["runner_up"]["recipe"] == "rtn(format=int8-ch)"
    inc = d["chosen"]["figures"]["ppl_increase_pct"]
    assert inc["method"] == "measured" and inc["lo"] <= inc["value"] <= inc["hi"]
    none = runner.invoke(
        app, ["recommend", str(store), "--max-model-bytes", "1kB", "--objective", "bytes"]
    )
    assert none.exit_code == 0 and "nothing meets the constraints" in none.stdout
    assert "closest:" in none.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--objective", "energy"], "no finished run has a j_per_token figure"),
        (["--objective", "speed"], "unknown objective"),
        (["--max-model-bytes", "lots"], "is not a size"),
        (["--hardware", "h100"], "no prediction for hardware 'h100'"),
        (["--objective", "bytes", "--pareto", "vibes"], "unknown Pareto figure"),
    ],
)
def test_recommend_bad_input_is_one_line_exit_2(swept, args, message):
    _, store, _ = swept
    r = runner.invoke(app, ["recommend", str(store), *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_spec_errors_name_the_line(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text('models = ["smollm2-135m"]\nrecipes = ["baseline"]\n[eval]\ntasks = ["mmlu"]\n')
    r = runner.invoke(app, ["sweep", str(spec), "--store", str(tmp_path / "s.db")])
    assert r.exit_code == 2 and "bad.toml:4" in r.output and "eval.tasks" in r.output
    r = runner.invoke(app, ["sweep", str(tmp_path / "none.toml")])
    assert r.exit_code == 2 and "no sweep spec" in r.output
    r = runner.invoke(app, ["recommend", str(tmp_path / "none.db")])
    assert r.exit_code == 2 and "no store" in r.output
    spec.write_text('models = ["smollm2-135m"]\nrecipes = [\n  "rtn(formt=int8)"\n]\n[eval]\n')
    r = runner.invoke(app, ["sweep", str(spec)])
    assert r.exit_code == 2 and "bad.toml:3" in r.output and "recipes" in r.output


def test_recommend_on_an_eval_only_store_names_the_bench_table_intact(swept):
    # rich markup once swallowed the "[bench]", leaving "add a  table to the spec"
    _, store, _ = swept
    r = runner.invoke(app, ["recommend", str(store), "--objective", "energy"])
    assert r.exit_code == 2 and "add a [bench] table to the spec" in r.stderr, r.output
