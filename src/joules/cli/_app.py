"""The typer application and the helpers every command shares.

Commands live in one module each beside this file (``doctor.py``, ``demo.py``, ``measure.py``...)
and register themselves on :data:`app`. Printing happens only here in the CLI: commands call the
library, get typed results back, and render them as a rich table or, with ``--json``, as JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from joules.errors import JoulesError


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


def to_jsonable(obj: Any) -> Any:
    """Turn dataclasses, enums, paths and tensors into plain JSON values (NaN/inf become null)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return to_jsonable(obj.to_dict())
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return to_jsonable(obj.tolist())
    return obj


def print_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON on stdout (no rich markup, no wrapping)."""
    print(json.dumps(to_jsonable(obj), indent=2))


def emit(result: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Print ``result`` as JSON when asked, else through the command's rich ``render``."""
    if as_json:
        print_json(result)
    else:
        render(result)
