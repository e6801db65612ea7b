"""The rich console, progress bars, and the single place that turns errors into exit codes."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text
from typer.core import TyperGroup

from deltakd_cli import distributed
from deltakd_cli.errors import DeltakdError, Interrupted

if TYPE_CHECKING:  # imported when a bar is shown, not to print --help
    import click
    from rich.progress import Progress

DEBUG_ENV = "DELTAKD_DEBUG"  # set: OS errors keep their traceback
LOG_SECONDS_ENV = "DELTAKD_LOG_SECONDS"  # plain progress lines: at most one every N seconds
DEFAULT_LOG_SECONDS = 30.0

console = Console(stderr=True, highlight=False)
LOGGER = logging.getLogger("deltakd")
# A log file, a pipe or a batch job's output: never hard-wrap a line at the default 80 columns
# (an echoed command must run as printed, a number must not split); a terminal wraps itself.
console.soft_wrap = not console.is_terminal


def info(message: str) -> None:
    """Print a status line (rank 0 only), and log it to the "deltakd" logger (INFO) for the
    Python API, which keeps the console quiet unless asked (deltakd/__init__.py)."""
    if distributed.is_main_process():
        console.print(message)
        if LOGGER.isEnabledFor(logging.INFO):
            LOGGER.info(Text.from_markup(message).plain)


def progress(unit: str = "step") -> Progress | PlainProgress:
    """The progress of a stage, silent on ranks other than 0. Tasks take a `status` field (free
    text: losses, rates, which model).

    In a terminal: a rich bar whose columns fit 80 columns (description, bar, count, elapsed,
    ETA, then the status, which is cut first). Elsewhere (a file, a pipe, a batch job's log):
    plain lines (`PlainProgress`), `unit` naming what is counted (`step 12/300`)."""
    disabled = not distributed.is_main_process() or console.quiet  # the API's quiet mode
    if not disabled and not console.is_terminal and not console.is_jupyter:
        return PlainProgress(unit, log_seconds())
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Column
    from rich.text import Text

    class StatusColumn(ProgressColumn):
        """A task's free text (its `status` field): the column that gives way first, cut with an
        ellipsis to the width the other columns leave, so the bar's count and ETA always show."""

        def __init__(self) -> None:
            super().__init__(table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"))

        def render(self, task: Task) -> Text:
            return Text(str(task.fields.get("status", "")), no_wrap=True, overflow="ellipsis")

    return Progress(
        TextColumn(
            "[bold]{task.description}",
            table_column=Column(max_width=24, no_wrap=True, overflow="ellipsis"),
        ),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        StatusColumn(),
        console=console,
        disable=disabled,
        transient=False,
        expand=True,
    )


def log_seconds() -> float:
    """DELTAKD_LOG_SECONDS: the least time between two plain progress lines of a task (0: every
    update); default 30."""
    raw = os.environ.get(LOG_SECONDS_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_LOG_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        info(
            f"[yellow]note:[/yellow] {LOG_SECONDS_ENV}={escape(raw)} is not a number of seconds "
            f">= 0; using {DEFAULT_LOG_SECONDS:g}"
        )
        return DEFAULT_LOG_SECONDS
    return value


def clock(seconds: float | None) -> str:
    """H:MM:SS (as rich shows times), or -:--:-- when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    return str(timedelta(seconds=int(max(seconds, 0))))


@dataclass
class _PlainTask:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    start_completed: float = 0.0
    last_line: float = -math.inf
    shown: tuple | None = None  # the state the last line showed
    ended: bool = False

    def state(self) -> tuple:
        return (self.description, self.total, self.completed, str(self.fields.get("status", "")))

    @property
    def finished(self) -> bool:
        return self.total is not None and self.completed >= self.total


class PlainProgress:
    """Progress as plain, complete lines on stderr, for output that is not a terminal: a line
    when a task starts, then at most one every `every` seconds, and one when it ends (or when the
    stage stops), each flushed at once:

        distill step 12/300 (4%) loss 1.2345 sft 1.1 ... elapsed 0:01:02 eta 0:24:10

    The ETA comes from the rate since the task started. Same calls as rich's Progress
    (`add_task`, `update`, `advance`, a context manager)."""

    def __init__(self, unit: str = "step", every: float = DEFAULT_LOG_SECONDS) -> None:
        self.unit = unit
        self.every = every
        self.tasks: dict[int, _PlainTask] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task in self.tasks.values():  # the end of the stage: where every task stands
            if task.shown != task.state():
                self._line(task)

    def add_task(
        self, description: str, total: float | None = None, completed: float = 0, **fields: Any
    ) -> int:
        task_id = len(self.tasks)
        task = _PlainTask(str(description), total, completed, dict(fields))
        task.start_completed = completed
        self.tasks[task_id] = task
        self._line(task)
        return task_id

    def update(
        self,
        task_id: int,
        *,
        total: float | None = None,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        **fields: Any,
    ) -> None:
        task = self.tasks[task_id]
        fields.pop("visible", None)
        fields.pop("refresh", None)
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = str(description)
        task.fields.update(fields)
        if task.finished and not task.ended:
            task.ended = True
            self._line(task)
        elif time.monotonic() - task.last_line >= self.every and task.shown != task.state():
            self._line(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def line(self, task_id: int) -> str:
        """A task's progress line as it stands."""
        task = self.tasks[task_id]
        completed = _number(task.completed)
        parts = [task.description, self.unit]
        if task.total:
            percent = math.floor(100 * task.completed / task.total)
            parts.append(f"{completed}/{_number(task.total)} ({percent}%)")
        else:
            parts.append(completed)
        status = " ".join(str(task.fields.get("status", "")).split())
        if status:
            parts.append(status)
        elapsed = time.monotonic() - task.started
        parts += [f"elapsed {clock(elapsed)}", f"eta {clock(self._eta(task, elapsed))}"]
        return " ".join(part for part in parts if part)

    def _eta(self, task: _PlainTask, elapsed: float) -> float | None:
        if task.total is None:
            return None
        if task.finished:
            return 0.0
        done = task.completed - task.start_completed
        if done <= 0 or elapsed <= 0:
            return None
        return (task.total - task.completed) * elapsed / done

    def _line(self, task: _PlainTask) -> None:
        task_id = next(key for key, value in self.tasks.items() if value is task)
        out = console.file
        out.write(self.line(task_id) + "\n")
        out.flush()
        task.last_line = time.monotonic()
        task.shown = task.state()


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def report_error(error: DeltakdError) -> None:
    """The one line a user sees for a DeltakdError (or an interruption)."""
    prefix = f"[rank {distributed.rank()}] " if distributed.world_size() > 1 else ""
    label = (
        "[yellow]interrupted:[/yellow]" if isinstance(error, Interrupted) else "[red]error:[/red]"
    )
    console.print(f"{label} {escape(prefix + str(error))}", soft_wrap=True)


def _from_worker(error: DeltakdError) -> DeltakdError:
    """A DeltakdError raised in a DataLoader worker comes back as "Caught DeltakdError in
    DataLoader worker process N" plus the worker's traceback: keep its own one line."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and "DataLoader worker process" in lines[0]:
        message = lines[-1].split(": ", 1)[-1]
        return type(error)(message)
    return error


def as_deltakd_error(error: BaseException) -> DeltakdError | None:
    """The one-line form of an error that is the user's or the machine's, not a bug: Ctrl-C,
    OS errors that escaped the places that name their path (a full disk, a permission), and,
    under torchrun, torch.distributed's word that a peer went away (the peer's line says why)."""
    if isinstance(error, DeltakdError):
        return _from_worker(error)
    if isinstance(error, KeyboardInterrupt):
        return Interrupted("stopped by the user; rerun the same command to continue")
    if distributed.world_size() > 1 and (
        distributed.is_peer_lost(error) or distributed.failed_peer() is not None
    ):  # another rank stopped first (its own line says why): this error is in its wake
        return distributed.peer_stopped()
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


def _reported(raised: BaseException) -> int:
    """Print a user-facing error as one line and give its exit code; re-raise anything else."""
    error = as_deltakd_error(raised)
    if error is None:
        raise raised
    own_failure = not isinstance(error, (distributed.RankFailed, Interrupted))
    if own_failure:
        distributed.announce_failure(str(error))  # the other ranks name this one's reason
    report_error(error)
    distributed.stopped(wait_for_peers=own_failure)
    return error.exit_code


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Call `fn`; a user-facing error becomes one line and its exit code (2, or 130 for Ctrl-C)."""
    try:
        return fn()
    except BrokenPipeError:
        _quiet_broken_pipe()
    except (DeltakdError, KeyboardInterrupt, OSError, RuntimeError) as raised:
        sys.exit(_reported(raised))


class GuardedGroup(TyperGroup):
    """The app's command group: errors become one line and an exit code inside the click
    command itself, so `deltakd`, `python -m deltakd_cli` and test runners behave alike."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except (DeltakdError, KeyboardInterrupt, OSError, RuntimeError) as raised:
            ctx.exit(_reported(raised))
