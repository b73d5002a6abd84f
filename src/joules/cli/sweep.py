"""``joules sweep``: run every configuration of a spec and store the results (resumable).

    $ joules sweep sweep.toml                        # local, one run at a time, into joules.db
    $ joules sweep sweep.toml --store results.db --retry-failed
    $ joules sweep sweep.toml --executor ray --address ray://head:10001

A second invocation skips finished runs; failed runs are re-tried only with ``--retry-failed``.
A finished run whose key no longer matches (the joules code, a library, the model's content, a
recipe default or the compute path changed) is stale: it is listed with what changed and re-run,
or, with ``--reuse-stale``, kept and marked stale in the store.
See ``joules.sweep.spec`` for the spec and ``joules.sweep.store`` for the store's schema.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from joules.cli._app import JSON_OPTION, app, console, print_json, rich_progress
from joules.sweep.runner import SweepProgress


class _RichProgress(SweepProgress):
    """Two bars: the sweep's runs, and the current run's phase."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.sweep_task = bar.add_task("sweep", total=None)
        self.phase_task = bar.add_task("", total=None)

    def sweep(self, done: int, total: int) -> None:
        self.bar.update(self.sweep_task, completed=done, total=total)

    def run_start(self, label: str) -> None:
        self.bar.update(self.sweep_task, description=f"sweep · {escape(label)}")
        self.bar.update(self.phase_task, description="", completed=0, total=None)

    def phase(self, name: str, done: int | None = None, total: int | None = None) -> None:
        self.bar.update(
            self.phase_task, description=f"  {escape(name)}", completed=done or 0, total=total
        )

    def run_end(self, label: str, status: str) -> None:
        mark = "[green]done[/]" if status == "done" else "[red]failed[/]"
        self.bar.console.print(f"{mark} {escape(label)}")


def _render(summary: Any, store: str) -> None:
    t = Table(title=f"sweep → {store}", title_justify="left")
    for col in ("runs", "already done", "ran", "failed", "failed earlier (not retried)", "wall"):
        t.add_column(col, justify="right")
    t.add_row(
        str(summary.total),
        str(summary.skipped),
        str(summary.ran),
        str(summary.failed),
        str(summary.failed_before),
        f"{summary.wall_s:.1f} s",
    )
    console.print(t)
    for label, error in summary.failures:
        console.print(f"[red]failed[/] {escape(label)}: {escape(error)}", soft_wrap=True)
    if summary.failed_before:
        console.print("[dim]re-try failed runs with --retry-failed[/]")
    for label, reasons in summary.stale_rerun:
        console.print(
            f"[yellow]stale, re-run[/] {escape(label)}: {escape('; '.join(reasons))}",
            soft_wrap=True,
        )
    for label, reasons in summary.stale_reused:
        console.print(
            f"[yellow]stale, reused (--reuse-stale)[/] {escape(label)}: "
            f"{escape('; '.join(reasons))}",
            soft_wrap=True,
        )
    if summary.stale_reused:
        console.print(
            "[dim]reused stale results are marked so in the store; run without --reuse-stale "
            "to re-run them[/]"
        )
    console.print(
        f"[dim]next: joules recommend {store} --max-ppl-increase 2% --objective energy[/]"
    )


@app.command("sweep")
def sweep_cmd(
    spec: str = typer.Argument(..., help="The sweep spec (TOML)."),
    store: str = typer.Option("joules.db", "--store", help="SQLite store to write (resumable)."),
    executor: str = typer.Option("local", "--executor", help="local (default) or ray."),
    address: str = typer.Option(
        None, "--address", help="ray: address of an existing cluster (default: start one here)."
    ),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Re-run runs stored as failed."
    ),
    reuse_stale: bool = typer.Option(
        False,
        "--reuse-stale",
        help="Keep finished runs whose key is stale (code, libraries, model content, recipe "
        "defaults or compute path changed) instead of re-running them; they are marked stale.",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run models × recipes × tasks × workloads × hardware; store each result as it finishes."""
    from joules.sweep import load_spec, run_sweep

    parsed = load_spec(spec)
    with rich_progress(as_json) as bar:
        summary = run_sweep(
            parsed,
            store,
            executor=executor,
            address=address,
            retry_failed=retry_failed,
            reuse_stale=reuse_stale,
            progress=_RichProgress(bar),
        )
    if as_json:
        print_json(summary)
    else:
        _render(summary, store)
    if summary.failed:
        raise typer.Exit(1)
