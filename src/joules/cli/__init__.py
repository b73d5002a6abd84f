"""The ``joules`` command line: a thin shell over the library.

    $ joules --version
    $ joules doctor --json
    $ joules demo

Each command is a module beside this file that registers itself on the shared typer ``app``;
bad input raises :class:`joules.errors.JoulesError`, which the root group turns into a one-line
message on stderr and exit status 2.
"""

from __future__ import annotations

import typer

from joules import __version__
from joules.cli._app import app


def _version_callback(value: bool) -> None:
    if value:
        print(f"joules {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """Find the most energy-efficient way to run a model, and prove it with measurements."""


# Command modules register themselves on `app` when imported.
from joules.cli import (  # noqa: E402, F401
    bench,
    compress,
    demo,
    doctor,
    eval,
    export,
    formats,
    measure,
    predict,
    recommend,
    report,
    sweep,
)


def main() -> None:
    """Entry point of the ``joules`` script."""
    app()


__all__ = ["app", "main"]
