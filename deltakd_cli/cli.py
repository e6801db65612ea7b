"""The typer app: one function per command. Each parses and validates its options, calls one
function of the modules below, and prints the summary. No math and no I/O loops here."""

from __future__ import annotations

import typer

from deltakd_cli import __version__
from deltakd_cli.console import run_guarded

app = typer.Typer(
    name="deltakd",
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


# --- cache-teachers / inspect (cache stage) ---

# --- distill / finetune (training stage) ---

# --- eval (evaluation stage) ---

# --- init-student / demo (embedded default) ---


def main() -> None:
    run_guarded(app)
