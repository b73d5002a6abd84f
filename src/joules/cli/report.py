"""``joules report``: the sweep store as one self-contained HTML file, or as a data export.

$ joules report joules.db -o report.html
$ joules report joules.db -o report.html --max-kld 0.05 --objective energy
$ joules report joules.db -o report.html --max-ppl-increase 2% --max-model-bytes 100MB
$ joules report joules.db --to csv -o joules.csv
$ joules report joules.db --to parquet -o joules.parquet   # needs pyarrow
$ joules report joules.db --to json -o joules.json

The HTML report opens with the file to ship: what ``joules recommend`` chooses under the same
constraints and objective (per bench workload), beside the runner-up and the llama.cpp peer of
the same size. The constraints and objective choose that answer only; exports hold every figure.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer

from joules.cli._app import app, console
from joules.errors import ConfigError
from joules.sweep.analyze import OBJECTIVES, Constraints, parse_bytes, parse_percent


def _kld(text: str) -> float:
    """'0.05' -> 0.05 (nats per token)."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"--max-kld {text!r} is not a KL divergence: write e.g. 0.05 (nat)")
    return v


@app.command("report")
def report_cmd(
    store: Path = typer.Argument(..., help="The sweep store (SQLite) to report on."),
    out: Path = typer.Option(..., "-o", "--out", help="File to write."),
    to: str = typer.Option(
        "html", "--to", help="html (the report), or an export: csv, parquet, json."
    ),
    max_kld: str = typer.Option(
        None, "--max-kld", help="e.g. 0.05: mean KL divergence from the base model, nat/token."
    ),
    max_ppl_increase: str = typer.Option(
        None, "--max-ppl-increase", help="e.g. 2%: perplexity increase over the baseline."
    ),
    max_model_bytes: str = typer.Option(None, "--max-model-bytes", help="e.g. 100MB."),
    objective: str = typer.Option(
        "energy", "--objective", help="What the answer minimises: " + "|".join(OBJECTIVES) + "."
    ),
) -> None:
    """Write an HTML report of a sweep store (the file to ship first), or export its figures."""
    from joules.report import EXPORTS, export, render_report

    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    constraints = Constraints(
        max_kld=None if max_kld is None else _kld(max_kld),
        max_ppl_increase_pct=None if max_ppl_increase is None else parse_percent(max_ppl_increase),
        max_model_bytes=None
        if max_model_bytes is None
        else parse_bytes(max_model_bytes, "--max-model-bytes"),
    )
    if to == "html":
        path = render_report(store, out, constraints, objective)
        console.print(f"report written to {path}", highlight=False)
        console.print(f"open it in a browser: {path.resolve().as_uri()}", soft_wrap=True)
    elif to in EXPORTS:
        path = export(store, to, out)
        console.print(f"{to} written to {path}", highlight=False, soft_wrap=True)
    else:
        raise ConfigError(f"--to {to!r}: choose one of html, {', '.join(EXPORTS)}")
