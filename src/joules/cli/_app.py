"""The typer application and the helpers every command shares.

Commands live in one module each beside this file (``doctor.py``, ``demo.py``, ``measure.py``...)
and register themselves on :data:`app`. Printing happens only here in the CLI: commands call the
library, get typed results back, and render them as a rich table or, with ``--json``, as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from joules.errors import JoulesError
from joules.serialize import to_jsonable


class _JoulesGroup(TyperGroup):
    """Root group: a :class:`JoulesError` from any command becomes one line on stderr, exit 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except JoulesError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_JoulesGroup,
    name="joules",
    help="Find the most energy-efficient way to run a model, and prove it with measurements.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Tables and progress go to stdout for people; errors go to stderr.
console = Console()
err_console = Console(stderr=True)

JSON_OPTION = typer.Option(False, "--json", help="Print JSON for machines instead of a table.")


def print_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON on stdout (no rich markup, no wrapping)."""
    print(json.dumps(to_jsonable(obj), indent=2))


def emit(result: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Print ``result`` as JSON when asked, else through the command's rich ``render``."""
    if as_json:
        print_json(result)
    else:
        render(result)
