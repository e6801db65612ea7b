"""The typer app. Each command is built from its options dataclass (commands.py): the flags,
help and defaults come from the dataclass, the values become one options object, and the
command's function runs with it. No math and no I/O here."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import typer

from deltakd_cli import __version__
from deltakd_cli.commands import COMMANDS, Command, run_command
from deltakd_cli.console import GuardedGroup, run_guarded
from deltakd_cli.options import from_values, typer_parameters

app = typer.Typer(
    name="deltakd",
    cls=GuardedGroup,
    help="Delta Knowledge Distillation: cache both teachers once, distil the student, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deltakd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """deltakd: Delta-KD for language models."""


def _callback(command: Command) -> Callable[..., Any]:
    """A typer callback whose parameters are the options dataclass's fields."""

    def callback(**values: Any) -> None:
        run_command(command.name, from_values(command.options, values))

    callback.__signature__ = inspect.Signature(typer_parameters(command.options))
    callback.__name__ = command.name.replace("-", "_")
    callback.__doc__ = " ".join((command.options.__doc__ or "").split())
    return callback


for _command in COMMANDS:
    app.command(_command.name)(_callback(_command))


def main() -> None:
    run_guarded(app)
