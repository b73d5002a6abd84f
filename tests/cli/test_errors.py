"""Errors reach stderr exactly as written: brackets are text, not rich markup."""

from __future__ import annotations

from typer.testing import CliRunner

from joules.cli import app
from joules.errors import ConfigError

runner = CliRunner()

# brackets as TOML tables, a rich closing tag and a style name: each once vanished or crashed
MESSAGE = (
    "no finished run has a j_per_token figure: add a [bench] table to the spec, "
    "or [eval] tasks = ['wikitext2']; [/] and [bold]x[/bold] are text too, and a message longer "
    "than the terminal stays on one line"
)


def test_an_error_message_with_brackets_arrives_intact_with_status_2():
    @app.command("raise-for-test", hidden=True)
    def _raise() -> None:
        raise ConfigError(MESSAGE)

    try:
        r = runner.invoke(app, ["raise-for-test"])
    finally:
        app.registered_commands = [c for c in app.registered_commands if c.name != "raise-for-test"]
    assert r.exit_code == 2
    assert r.stderr == f"error: {MESSAGE}\n"
    assert r.stdout == ""


def test_a_spec_error_naming_a_toml_table_keeps_it(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('models = ["smollm2-135m"]\nrecipes = ["baseline"]\n')
    r = runner.invoke(app, ["sweep", str(spec), "--store", str(tmp_path / "s.db")])
    assert r.exit_code == 2, r.output
    assert "missing [eval] table; e.g. [eval] tasks" in r.stderr
