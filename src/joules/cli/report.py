"""``joules report``: the sweep store as one self-contained HTML file, or as a data export.

$ joules report joules.db -o report.html
$ joules report joules.db --to csv -o joules.csv
$ joules report joules.db --to parquet -o joules.parquet   # needs pyarrow
$ joules report joules.db --to json -o joules.json
"""

from __future__ import annotations

from pathlib import Path

import typer

from joules.cli._app import app, console
from joules.errors import ConfigError


@app.command("report")
def report_cmd(
    store: Path = typer.Argument(..., help="The sweep store (SQLite) to report on."),
    out: Path = typer.Option(..., "-o", "--out", help="File to write."),
    to: str = typer.Option(
        "html", "--to", help="html (the report), or an export: csv, parquet, json."
    ),
) -> None:
    """Write an HTML report of a sweep store, or export its figures (CSV, Parquet, JSON)."""
    from joules.report import EXPORTS, export, render_report

    if to == "html":
        path = render_report(store, out)
        console.print(f"report written to {path}", highlight=False)
        console.print(f"open it in a browser: {path.resolve().as_uri()}", soft_wrap=True)
    elif to in EXPORTS:
        path = export(store, to, out)
        console.print(f"{to} written to {path}", highlight=False, soft_wrap=True)
    else:
        raise ConfigError(f"--to {to!r}: choose one of html, {', '.join(EXPORTS)}")
