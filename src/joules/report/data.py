"""Read a sweep store into plain tables, and export them (CSV, Parquet, JSON).

    >>> from joules.report.data import load_report_data
    >>> data = load_report_data(":memory:")
    >>> data.runs, data.metric_rows()
    ([], [])

``metric_rows()`` is the long form every export writes: one row per figure of every finished
run (run key, model, recipe, methods, workload, figure name, hardware ('' = measured on this
machine, else a predicted target), value, 95 % interval, unit, method). The JSON export adds
each run's config, versions, manifest summary and dates.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joules.errors import ConfigError
from joules.serialize import atomic_open, atomic_path, atomic_write_json
from joules.sweep.store import RunRow, Store

EXPORTS = ("csv", "parquet", "json")
METRIC_COLUMNS = (
    "run_key", "model", "recipe", "methods", "workload", "name", "hardware", "value", "lo", "hi",
    "unit", "method",
)  # fmt: skip
_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")


def recipe_methods(recipe: str) -> list[str]:
    """The step names of a recipe text: ``"awq(format=int4) | gptq(...)"`` -> ``["awq", "gptq"]``
    (``baseline`` for the unchanged model)."""
    names = _STEP.findall(recipe)
    return names or [recipe.strip() or "baseline"]


@dataclass
class ReportData:
    """Everything the report shows: runs (done and failed), their dates and the store's meta."""

    path: str
    runs: list[RunRow]
    dates: dict[str, dict[str, Any]]  # key -> {host, started_at, finished_at}
    meta: dict[str, str]

    @property
    def done(self) -> list[RunRow]:
        return [r for r in self.runs if r.status == "done"]

    def metric_rows(self) -> list[dict[str, Any]]:
        out = []
        for r in self.done:
            for m in r.metrics:
                out.append(
                    {
                        "run_key": r.key,
                        "model": r.model,
                        "recipe": r.recipe,
                        "methods": " | ".join(recipe_methods(r.recipe)),
                        "workload": r.workload or "",
                        "name": m.name,
                        "hardware": m.hardware,
                        "value": m.value,
                        "lo": m.lo,
                        "hi": m.hi,
                        "unit": m.unit,
                        "method": m.method,
                    }
                )
        return out

    def to_json(self) -> dict[str, Any]:
        runs = []
        for r in self.runs:
            man = r.manifest or {}
            runs.append(
                {
                    "key": r.key,
                    "model": r.model,
                    "recipe": r.recipe,
                    "methods": recipe_methods(r.recipe),
                    "workload": r.workload,
                    "status": r.status,
                    "error": r.error,
                    "config": r.config,
                    "versions": r.versions,
                    **self.dates.get(r.key, {}),
                    "wall_s": r.wall_s,
                    "bits_per_weight": man.get("bits_per_weight"),
                    "model_bytes": man.get("model_bytes"),
                    "metrics": [vars(m) for m in r.metrics],
                }
            )
        return {"store": self.path, "meta": self.meta, "runs": runs}


def load_report_data(store_path: str | Path) -> ReportData:
    """Read every run of the store at ``store_path`` (a missing file is a ConfigError)."""
    path = str(store_path)
    if path != ":memory:" and not Path(path).is_file():
        raise ConfigError(f"store {path!r} does not exist: run `joules sweep` first")
    with Store(path) as store:
        runs = store.runs()
        dates = {
            k: {"host": h, "started_at": s, "finished_at": f}
            for k, h, s, f in store.conn.execute(
                "SELECT key, host, started_at, finished_at FROM runs"
            )
        }
        meta = dict(store.conn.execute("SELECT key, value FROM meta"))
    return ReportData(path, runs, dates, meta)


def export(store_path: str | Path, to: str, out_path: str | Path) -> Path:
    """Write the store's figures as ``to`` (csv | parquet | json) to ``out_path``."""
    if to not in EXPORTS:
        raise ConfigError(f"--to {to!r}: choose one of {', '.join(EXPORTS)}")
    data = load_report_data(store_path)
    out = Path(out_path)
    if not out.parent.is_dir():
        raise ConfigError(f"output {str(out)!r}: directory {str(out.parent)!r} does not exist")
    rows = data.metric_rows()
    if to == "json":
        atomic_write_json(out, data.to_json(), indent=1, sort_keys=True, allow_nan=False)
    elif to == "csv":
        with atomic_open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            w.writeheader()
            w.writerows(rows)
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(
                "--to parquet needs pyarrow: `pip install pyarrow` (or export --to csv)"
            ) from None
        types = {"value": pa.float64(), "lo": pa.float64(), "hi": pa.float64()}
        schema = pa.schema([(c, types.get(c, pa.string())) for c in METRIC_COLUMNS])
        table = pa.Table.from_pylist(rows, schema=schema)
        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
    return out
