"""The typer app. Each command is built from its options dataclass (commands.py): the flags,
help and defaults come from the dataclass, the values become one options object, and the
command's function runs with it. A command is built (its options module imported) only when it
is run or its help is asked for, so `deltakd --help` and `--version` answer quickly. No math and
no I/O here."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import typer

from deltakd_cli import __version__
from deltakd_cli.commands import BY_NAME, COMMANDS, OPTIONS_BY_COMMAND, Command, run_command
from deltakd_cli.console import GuardedGroup, info, run_guarded
from deltakd_cli.errors import DeltakdError
from deltakd_cli.options import (
    check,
    flag_of,
    from_values,
    literal,
    option_fields,
    typer_parameters,
)

HELP_SETTINGS = {"help_option_names": ["-h", "--help"]}


class LazyGroup(GuardedGroup):
    """The root group: COMMANDS are built on first use; `deltakd --help` lists them by their
    summary without building any (a command's own `--help` builds that one)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*BY_NAME, *(name for name in self.commands if name not in BY_NAME)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in BY_NAME and name not in self.commands:
            self.commands[name] = build_command(BY_NAME[name])
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(command.name, command.summary) for command in COMMANDS]
        rows += [
            (name, command.get_short_help_str(formatter.width))
            for name, command in self.commands.items()
            if name not in BY_NAME and not command.hidden
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


app = typer.Typer(
    name="deltakd",
    cls=LazyGroup,
    help="Delta Knowledge Distillation: cache both teachers once, distil the student, evaluate.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
    pretty_exceptions_enable=False,
    context_settings=HELP_SETTINGS,
    # The root help is click's plain text: typer's rich help imports rich's markdown stack,
    # twice the time of the rest of `deltakd --help`. Each command's own help stays rich.
    rich_markup_mode=None,
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


ALIAS_SUFFIX = "__old_flag"  # the hidden parameter of a flag's old spelling


def alias_parameters(cls: type) -> list[inspect.Parameter]:
    """A hidden parameter per field with old flag spellings (opt's `aliases`)."""
    import typing

    hints = typing.get_type_hints(cls)
    return [
        inspect.Parameter(
            field.name + ALIAS_SUFFIX,
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, *field.metadata["aliases"], hidden=True),
            annotation=hints[field.name] | None,
        )  # fmt: skip
        for field in option_fields(cls)
        if field.metadata.get("aliases")
    ]


def _from_old_flags(cls: type, values: dict[str, Any], given: set[str]) -> None:
    """Move the values given under an old flag to their field (a note names the new flag)."""
    fields = {f.name: f for f in option_fields(cls)}
    for key in [k for k in values if k.endswith(ALIAS_SUFFIX)]:
        value, name = values.pop(key), key.removesuffix(ALIAS_SUFFIX)
        if key not in given:
            continue
        old, new = "/".join(fields[name].metadata["aliases"]), flag_of(fields[name])
        if name in given:
            raise DeltakdError(f"{new} is given twice (also as {old}, its old name)")
        info(f"[yellow]note:[/yellow] {old} is now {new}; the old name goes in the next release")
        values[name] = value
        given.add(name)


def options_of(
    command: Command, values: dict[str, Any], ctx: typer.Context, config_file: Path | None
) -> Any:
    """The command's options object: the flags given on the command line (an old spelling
    too), then the config file's values, then the defaults."""
    given = {
        name
        for name in values
        # by name: typer vendors its own click, whose enum is not click's
        if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"
    }
    _from_old_flags(command.options, values, given)
    from deltakd_cli import config

    from_config = {}
    if config_file is not None:
        from_config = config.load(config_file, command.name, command.options, OPTIONS_BY_COMMAND)
    options = from_values(
        command.options, config.merge(command.options, values, given, from_config)
    )
    out = getattr(options, "out", None)
    if config_file is not None and isinstance(out, str) and "://" not in out:
        if Path(out).expanduser().resolve() == config_file.expanduser().resolve():
            raise DeltakdError(
                f"--out {out} is the config file itself: an output never replaces an input; "
                "choose another path"
            )
    return options


CONFIG_OPTION = typer.Option(
    None,
    "--config",
    help="YAML (or JSON) file of options, keys as the option names; a run's run.json works "
    "too. Flags given here win. See: deltakd config show COMMAND.",
    metavar="FILE",
)


def _callback(command: Command) -> Callable[..., Any]:
    """A typer callback whose parameters are the options dataclass's fields (and --config)."""

    def callback(ctx: typer.Context, config_file: Path | None = None, **values: Any) -> None:
        run_command(command.name, options_of(command, values, ctx, config_file))

    context = inspect.Parameter(
        "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
    )
    config_parameter = inspect.Parameter(
        "config_file", inspect.Parameter.KEYWORD_ONLY, default=CONFIG_OPTION,
        annotation=Path | None,
    )  # fmt: skip
    callback.__signature__ = inspect.Signature(
        [
            context,
            *typer_parameters(command.options),
            *alias_parameters(command.options),
            config_parameter,
        ]
    )
    callback.__name__ = command.name.replace("-", "_")
    callback.__doc__ = literal(" ".join((command.options.__doc__ or "").split()))
    return callback


def build_command(command: Command) -> click.Command:
    """The click command of one deltakd command (its help rich, as typer draws it)."""
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(command.name)(_callback(command))
    return typer.main.get_command(single)


config_app = typer.Typer(
    help="Config files: print a command's options as YAML to start one from.",
    no_args_is_help=True,
    context_settings=HELP_SETTINGS,
)
app.add_typer(config_app, name="config")


@config_app.command("show")
def _config_show(
    command: str = typer.Argument(..., help="The command: " + ", ".join(BY_NAME) + "."),
    config_file: Path | None = typer.Option(
        None,
        "--config",
        help="Show the values this file gives instead of the defaults.",
        metavar="FILE",
    ),
) -> None:
    """Print COMMAND's options as commented YAML (its defaults, or what --config FILE sets):
    save it, edit it, run with --config."""
    from deltakd_cli import config

    if command not in BY_NAME:
        raise DeltakdError(f"unknown command '{command}' (choose from {', '.join(BY_NAME)})")
    options = OPTIONS_BY_COMMAND[command]
    values = {}
    if config_file is not None:
        values = config.load(config_file, command, options, OPTIONS_BY_COMMAND)
        check(from_values(options, {**_all_defaults(options), **values}), partial=True)
    typer.echo(config.show(command, options, values), nl=False)


def _all_defaults(cls: type) -> dict[str, Any]:
    import dataclasses

    return {
        f.name: (f.default if f.default is not dataclasses.MISSING else None)
        for f in dataclasses.fields(cls)
        if f.default_factory is dataclasses.MISSING
    }


def main() -> None:
    run_guarded(app)
