"""The rich console, progress bars, and the single place that turns errors into exit codes."""

from __future__ import annotations

import os
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
from deltakd_cli.errors import DeltakdError, Interrupted

DEBUG_ENV = "DELTAKD_DEBUG"  # set: OS errors keep their traceback

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
    """The one line a user sees for a DeltakdError (or an interruption)."""
    prefix = f"[rank {distributed.rank()}] " if distributed.world_size() > 1 else ""
    label = (
        "[yellow]interrupted:[/yellow]" if isinstance(error, Interrupted) else "[red]error:[/red]"
    )
    console.print(f"{label} {escape(prefix + str(error))}", soft_wrap=True)


def as_deltakd_error(error: BaseException) -> DeltakdError | None:
    """The one-line form of an error that is the user's or the machine's, not a bug: Ctrl-C,
    and OS errors that escaped the places that name their path (a full disk, a permission)."""
    if isinstance(error, DeltakdError):
        return error
    if isinstance(error, KeyboardInterrupt):
        return Interrupted("stopped by the user; rerun the same command to continue")
    if isinstance(error, OSError) and not os.environ.get(DEBUG_ENV):
        where = f" ({error.filename})" if error.filename else ""
        reason = error.strerror or str(error) or type(error).__name__
        return DeltakdError(f"{reason}{where} (set {DEBUG_ENV}=1 for the traceback)")
    return None


def _quiet_broken_pipe() -> None:
    """The reader of our output went away (`deltakd ... | head`): stop quietly, as cat does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Call `fn`; a user-facing error becomes one line and its exit code (2, or 130 for Ctrl-C)."""
    try:
        return fn()
    except BrokenPipeError:
        _quiet_broken_pipe()
    except (DeltakdError, KeyboardInterrupt, OSError) as raised:
        error = as_deltakd_error(raised)
        if error is None:
            raise
        report_error(error)
        sys.exit(error.exit_code)


class GuardedGroup(TyperGroup):
    """The app's command group: errors become one line and an exit code inside the click
    command itself, so `deltakd`, `python -m deltakd_cli` and test runners behave alike."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except (DeltakdError, KeyboardInterrupt, OSError) as raised:
            error = as_deltakd_error(raised)
            if error is None:
                raise
            report_error(error)
            ctx.exit(error.exit_code)
