"""The typer application and the helpers every command shares.

Commands live in one module each beside this file (``doctor.py``, ``demo.py``, ``measure.py``...)
and register themselves on :data:`app`. Printing happens only here in the CLI: commands call the
library, get typed results back, and render them as a rich table or, with ``--json``, as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from joules.errors import ConfigError as JoulesConfigError
from joules.errors import JoulesError
from joules.serialize import to_jsonable


class _JoulesGroup(TyperGroup):
    """Root group: a :class:`JoulesError` from any command becomes one line on stderr, exit 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except JoulesError as exc:
            print_error(str(exc))
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


def print_error(message: str) -> None:
    """``error: MESSAGE`` on stderr, the message exactly as written.

    Messages name TOML tables (``[bench]``), recipes and paths; rich would read their brackets
    as markup and drop them, so the message is a plain :class:`~rich.text.Text`, never markup.
    """
    err_console.print(
        Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True
    )


def print_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON on stdout (no rich markup, no wrapping)."""
    print(json.dumps(to_jsonable(obj), indent=2))


def emit(result: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Print ``result`` as JSON when asked, else through the command's rich ``render``."""
    if as_json:
        print_json(result)
    else:
        render(result)


def doc_line(cls: type) -> str:
    """The first paragraph of a registered class's own docstring, on one line and without
    reST's double backquotes ('' when it has none), for the ``--list-*`` flags that show what
    each registered name does."""
    doc = (cls.__dict__.get("__doc__") or "").strip()
    if not doc or doc.startswith(f"{cls.__name__}("):  # the signature @dataclass writes
        return ""
    return " ".join(doc.split("\n\n", 1)[0].split()).replace("``", "")


def list_option(flag: str, callback: Callable[[bool], None], what: str) -> Any:
    """An eager ``--list-X`` flag that prints the registered ``what`` and exits (the registry
    is read only when the flag is given, so ``--help`` stays torch-free)."""
    return typer.Option(
        False, flag, callback=callback, is_eager=True, help=f"List the registered {what} and exit."
    )


def parse_ints(text: str, what: str) -> list[int]:
    """Comma-separated positive integers (``--prompt-len 128,512``), or a one-line error."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise JoulesConfigError(f"{what} must be comma-separated integers, got {text!r}") from exc
    if not out or min(out) < 1:
        raise JoulesConfigError(f"{what} must be positive integers, got {text!r}")
    return out


def rich_progress(as_json: bool) -> Any:
    """The bars of a long command (description, bar, done/total, elapsed, remaining), on stderr
    with --json so stdout stays pure JSON; removed when done. Use as a context manager."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console if as_json else console,
        transient=True,
    )


@contextmanager
def progress_bar(label: str, as_json: bool) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar (on stderr with --json, so stdout stays pure JSON); yields update."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console if as_json else console,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def large_model_file(model: str) -> str | None:
    """The GGUF file llama.cpp runs for a large MODEL when no ``--runtime`` was given (one line
    on stderr says so; a compressed directory is exported first, once), else None: torch."""
    from rich.markup import escape

    from joules.deploy.runtime_choice import pick_llamacpp

    choice = pick_llamacpp(model)
    if choice is None:
        return None
    err_console.print(f"[dim]{escape(choice.note)}[/]", soft_wrap=True)
    if choice.source is not None and not choice.path.is_file():
        with err_console.status(f"exporting {model} to GGUF"):
            return str(choice.ready())
    return str(choice.ready())
