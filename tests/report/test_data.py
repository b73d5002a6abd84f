"""Exports load back: CSV with the standard library, Parquet with pyarrow, JSON with json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from joules.errors import ConfigError
from joules.report import export, load_report_data
from joules.report.data import METRIC_COLUMNS, recipe_methods
from joules.sweep.store import Store
from joules.testing.report import write_fake_store


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return write_fake_store(tmp_path / "fake.db")


def _expected(store: Path) -> list[tuple[str, str, str, float]]:
    with Store(store) as s:
        return sorted(
            (r.key, m.name, m.hardware, m.value) for r in s.runs("done") for m in r.metrics
        )


def test_csv_loads_back_with_the_standard_library(store: Path, tmp_path: Path) -> None:
    out = export(store, "csv", tmp_path / "x.csv")
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == METRIC_COLUMNS
    got = sorted((r["run_key"], r["name"], r["hardware"], float(r["value"])) for r in rows)
    assert got == _expected(store)


def test_parquet_loads_back_with_pyarrow(store: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    rows = pq.read_table(export(store, "parquet", tmp_path / "x.parquet")).to_pylist()
    got = sorted((r["run_key"], r["name"], r["hardware"], r["value"]) for r in rows)
    assert got == _expected(store)


def test_parquet_without_pyarrow_names_the_fix(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ConfigError, match="pip install pyarrow"):
        export(store, "parquet", tmp_path / "x.parquet")


def test_json_has_every_run_with_its_provenance(store: Path, tmp_path: Path) -> None:
    d = json.loads(export(store, "json", tmp_path / "x.json").read_text())
    with Store(store) as s:
        assert [r["key"] for r in d["runs"]] == [r.key for r in s.runs()]
    done = [r for r in d["runs"] if r["status"] == "done"]
    assert all(r["versions"]["torch"] and r["finished_at"] for r in done)
    got = sorted(
        (r["key"], m["name"], m["hardware"], m["value"]) for r in done for m in r["metrics"]
    )
    assert got == _expected(store)


def test_bad_input_is_one_line(store: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="choose one of"):
        export(store, "xlsx", tmp_path / "x.xlsx")
    with pytest.raises(ConfigError, match="does not exist"):
        load_report_data(tmp_path / "missing.db")
    with pytest.raises(ConfigError, match="does not exist"):
        export(store, "csv", tmp_path / "no" / "x.csv")


def test_recipe_methods() -> None:
    assert recipe_methods("awq(format=int4-g64) | gptq(format=int4-g64)") == ["awq", "gptq"]
    assert recipe_methods("baseline") == ["baseline"]
