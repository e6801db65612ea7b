"""The rich console, progress bars, and the single place that turns errors into exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from typer.core import TyperGroup

from deltakd_cli import distributed
from deltakd_cli.errors import DeltakdError

console = Console(stderr=True, highlight=False)


def info(message: str) -> None:
    """Print a status line (rank 0 only)."""
    if distributed.is_main_process():
        console.print(message)


def progress(*extra_columns: Any) -> Progress:
    """A progress display with a bar, counts, elapsed time and ETA; silent on ranks other than 0."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not distributed.is_main_process(),
        transient=False,
    )


def report_error(error: DeltakdError) -> None:
    """The one line a user sees for a DeltakdError."""
    prefix = f"[rank {distributed.rank()}] " if distributed.world_size() > 1 else ""
    console.print(f"[red]error:[/red] {escape(prefix + str(error))}", soft_wrap=True)


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Call `fn`; a `DeltakdError` becomes one red line and exit 2, Ctrl-C exit 130."""
    try:
        return fn()
    except DeltakdError as error:
        report_error(error)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: rerun the same command to resume")
        sys.exit(130)


class GuardedGroup(TyperGroup):
    """The app's command group: errors become one line and an exit code inside the click
    command itself, so `deltakd`, `python -m deltakd_cli` and test runners behave alike."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DeltakdError as error:
            report_error(error)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]: rerun the same command to resume")
            ctx.exit(130)
