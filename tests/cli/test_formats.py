"""`joules formats list` and `joules formats compare`: tables, JSON, bad input."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from joules.cli import app

runner = CliRunner()


def test_list_table_and_json():
    r = runner.invoke(app, ["formats", "list"])
    assert r.exit_code == 0 and "mxfp4" in r.stdout and "nxfp4" in r.stdout
    r = runner.invoke(app, ["formats", "list", "--json"])
    rows = json.loads(r.stdout)
    by = {x["name"]: x for x in rows}
    assert by["mxfp4"]["bits_per_element"] == 4.25 and by["mxfp4"]["family"] == "mx"
    assert by["nf4"]["spec"] == "nf4" and all(x["emulated"] for x in rows)


def test_compare_synthetic_json():
    r = runner.invoke(
        app, ["formats", "compare", "--source", "laplace", "--formats", "int8,mxfp4", "--json"]
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["kind"] == "synthetic" and d["numel"] == 1024 * 4096
    assert [x["format"] for x in d["results"]] == ["int8", "mxfp4"]
    assert d["results"][1]["bound_max_abs_error"] > 0 and d["results"][0]["sqnr_db"] > 30


def test_compare_table_and_model_dir(tiny_dir):
    r = runner.invoke(app, ["formats", "compare", "--source", "gaussian", "--formats", "nf4,nxfp4"])
    assert r.exit_code == 0 and "nxfp4" in r.stdout and "SQNR" in r.stdout
    r = runner.invoke(
        app, ["formats", "compare", "--source", str(tiny_dir), "--formats", "int4-g32", "--json"]
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["kind"] == "model" and d["tensors"] > 0


def test_bad_inputs_exit_2_with_one_line():
    for args in (
        ["formats", "compare", "--formats", "int99"],
        ["formats", "compare", "--source", "/no/such/model"],
        ["formats", "compare", "--formats", "mxfp4-foo"],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert "error:" in r.output and len(r.output.strip().splitlines()) == 1
