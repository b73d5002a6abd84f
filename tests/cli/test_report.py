"""``joules report``: HTML and exports from the command line; bad input is one line, exit 2."""

from __future__ import annotations

import csv
from pathlib import Path

from typer.testing import CliRunner

from joules.cli import app
from joules.testing.report import write_fake_store

runner = CliRunner()


def test_report_html_and_csv(tmp_path: Path) -> None:
    store = write_fake_store(tmp_path / "fake.db")
    res = runner.invoke(app, ["report", str(store), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert "report written to" in res.output and (tmp_path / "r.html").stat().st_size > 1e6
    res = runner.invoke(app, ["report", str(store), "--to", "csv", "-o", str(tmp_path / "x.csv")])
    assert res.exit_code == 0, res.output
    with (tmp_path / "x.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) > 0


def test_report_bad_input_is_one_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["report", str(tmp_path / "none.db"), "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "does not exist" in res.output
    store = write_fake_store(tmp_path / "fake.db")
    res = runner.invoke(app, ["report", str(store), "--to", "xls", "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "choose one of html" in res.output
    assert "Traceback" not in res.output
