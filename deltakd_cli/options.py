"""Options written once. A command's options are a dataclass whose fields carry their default,
help text and checks (`opt`); everything else is derived from that one definition:

- the typer command's parameters (`typer_parameters`: names, flags, help, defaults);
- the checks of numbers and choices, each failing with one line that names the flag (`check`);
- the types of values given from code, a path as str or pathlib.Path (`with_types`);
- the record a run writes (`record`) and the command line a pipeline stage passes (`to_argv`).

Only the checks that involve several options or the file system stay in each workflow."""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltakd_cli.errors import DeltakdError

REQUIRED = dataclasses.MISSING


@dataclass(frozen=True)
class TextForm:
    """How a typed value is written on the command line: `parse(flag, text)` reads it once, as
    the options are built (one line naming the flag when it is wrong); `show(value)` writes it
    back so that parsing gives the same value (floats by repr, never rounded)."""

    parse: Callable[[str, str], Any]
    show: Callable[[Any], str]


def parse_numbers(flag: str, text: str) -> tuple[float, ...]:
    """A comma-separated list of finite numbers, each once, in the order given."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise DeltakdError(f"{flag} is empty; give comma-separated numbers, e.g. 0,0.5,1")
    numbers: list[float] = []
    for part in parts:
        try:
            number = float(part)
        except ValueError:
            raise DeltakdError(f"{flag}: {part!r} is not a number") from None
        if not math.isfinite(number):
            raise DeltakdError(f"{flag}: {part!r} is not a finite number")
        if number in numbers:
            raise DeltakdError(f"{flag}: {part} is given twice")
        numbers.append(number)
    return tuple(numbers)


def numbers_text(numbers: Sequence[float]) -> str:
    """`parse_numbers`' inverse: repr keeps every digit (0.1234567 stays 0.1234567)."""
    return ",".join(repr(float(number)) for number in numbers)


# A tuple of floats given as "0,0.5,1" (e.g. cache-teachers --gammas).
NUMBER_LIST = TextForm(parse_numbers, numbers_text)


def opt(
    default: Any = REQUIRED,
    help: str = "",
    *,
    flags: Sequence[str] | None = None,
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    finite: bool = False,
    argument: bool = False,
    metavar: str | None = None,
    cli: bool = True,
    default_factory: Any = None,
    section: str | None = None,
    key: str | None = None,
    text: TextForm | None = None,
    feeds: Sequence[str] = (),
    panel: str | None = None,
    aliases: Sequence[str] = (),
    local: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line option.

    `flags` replace the derived `--field-name` (e.g. a one-way `--resume`); `choices` (or a
    function giving them, when they live in a module the CLI must not import to show help; the
    help text then names them), `at_least`,
    `above`, `at_most`, `below` and `finite` are checked by `check`; `argument` makes it positional
    (a `list[str]` argument without a default takes one or more values, e.g. `report DIR...`);
    `cli=False` keeps a field off the command line (set by the program, recorded all the same);
    `section` and `key` place it in a nested config file (`eval: {limit: 5}` for a pipeline's
    `eval_limit`; config.py); `text` gives a typed field (a tuple of floats, say) its command-line
    form, read once into the typed value; `feeds` names the other config sections (stages) of a
    pipeline whose option of the same name takes this field's value (`alpha` of distill also sets
    the cache's); `panel` is the group its flag is listed under in --help (default: the option
    group class that declares it, else the command's own options); `aliases` are old spellings
    of the flag, still accepted (hidden from --help, with a note) for one release; `local` marks
    a path the command reads or writes on the local file system only (`LOCAL_KINDS`: an output
    folder or file, input folders): `check` maps a `file://` URL to its path and refuses any
    other URL in one line naming the command (fsspec locations, a cache, leave `local` unset)."""
    metadata = {
        "help": help,
        "flags": tuple(flags) if flags else None,
        "choices": choices if choices is None or callable(choices) else tuple(choices),
        "at_least": at_least,
        "above": above,
        "at_most": at_most,
        "below": below,
        "finite": finite,
        "argument": argument,
        "metavar": metavar,
        "cli": cli,
        "section": section,
        "key": key,
        "text": text,
        "feeds": tuple(feeds),
        "panel": panel,
        "aliases": tuple(aliases),
        "local": local,
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """The command-line flag of a field name: `max_new_tokens` -> `--max-new-tokens`."""
    return "--" + name.replace("_", "-")


def option_fields(cls_or_options: Any) -> list[dataclasses.Field]:
    """The command-line fields in the order a reader wants them: required ones first, then the
    command's own options, then those it shares (a subclass's fields before its base's)."""
    cls = cls_or_options if isinstance(cls_or_options, type) else type(cls_or_options)
    by_name = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    ordered: list[str] = []
    for klass in cls.__mro__:
        for name in getattr(klass, "__annotations__", {}):
            if name in by_name and name not in ordered:
                ordered.append(name)
    fields = [by_name[name] for name in ordered]
    return sorted(
        fields, key=lambda f: f.default is not REQUIRED or f.default_factory is not REQUIRED
    )


def choices_of(field: dataclasses.Field) -> tuple[Any, ...] | None:
    """The field's choices (None: any value), calling the function that gives them if needed."""
    choices = field.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def flag_of(field: dataclasses.Field) -> str:
    flags = field.metadata.get("flags")
    return flags[0] if flags else flag(field.name)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# ----------------------------------------------------------------------------- typer


OWN_PANEL = "Options"


def panel_of(cls: type, field: dataclasses.Field) -> str:
    """The --help panel of a field: its own `panel`, else what a class's PANELS (name -> panel)
    says, else the PANEL of the (group) class that declares it, else the command's own."""
    if field.metadata.get("panel"):
        return field.metadata["panel"]
    for klass in cls.__mro__:
        if field.name in klass.__dict__.get("PANELS", {}):
            return klass.__dict__["PANELS"][field.name]
    for klass in cls.__mro__:
        if field.name in getattr(klass, "__annotations__", {}):
            return klass.__dict__.get("PANEL", OWN_PANEL)
    return OWN_PANEL


MAX_CHOICES_METAVAR = 16  # longer choice lists go into the help text (the column stays narrow)


def metavar_of(field: dataclasses.Field) -> str | None:
    """What --help shows for the value: the field's own metavar, else its choices (a|b|c) when
    they are short and known without importing anything, else CHOICE (the help lists them)."""
    if field.metadata.get("metavar"):
        return field.metadata["metavar"]
    choices = field.metadata.get("choices")
    if choices and not callable(choices):
        joined = "|".join(str(choice) for choice in choices)
        return joined if len(joined) <= MAX_CHOICES_METAVAR else "CHOICE"
    return None


def help_with_choices(field: dataclasses.Field) -> str:
    """The field's help, with "One of: ..." when it does not name every choice itself (choices
    given by a function are named by the help already)."""
    text = " ".join(field.metadata.get("help", "").split())
    choices = field.metadata.get("choices")
    if choices and not callable(choices) and not all(str(c) in text for c in choices):
        text += " One of: " + ", ".join(str(c) for c in choices) + "."
    return text.strip()


def literal(text: str) -> str:
    """Help text shown as written: rich would read `deltakd[lora]` as markup and drop it. (It
    also reads `:name:` as an emoji: help texts avoid that pattern; tests/test_cli.py checks.)"""
    from rich.markup import escape

    return escape(text)


def typer_parameters(cls: type) -> list[inspect.Parameter]:
    """The parameters of a typer command for the options dataclass `cls`, in field order,
    required ones first (as typer shows them in --help). A required option may come from
    --config instead, so the command line leaves it unset (None) and config.merge names it
    when it is given nowhere."""
    import typer

    hints = _hints(cls)
    parameters = []
    for field in option_fields(cls):
        meta = field.metadata
        required = field.default is REQUIRED and field.default_factory is REQUIRED
        default = None if required else field.default
        help_text = literal(help_with_choices(field) + (" (required)" if required else ""))
        if field.default_factory is not REQUIRED:
            default = None
        if meta.get("argument"):
            info = typer.Argument(default, help=help_text, metavar=meta.get("metavar"))
        else:
            names = list(meta["flags"]) if meta.get("flags") else []
            if not names and hints[field.name] is bool and field.default is False:
                names = [flag(field.name)]  # off by default: a one-way flag, no --no-x to list
            info = typer.Option(
                default, *names, help=help_text, metavar=metavar_of(field),
                rich_help_panel=panel_of(cls, field),
            )  # fmt: skip
        annotation = str if meta.get("text") else hints[field.name]
        if required or field.default_factory is not REQUIRED:
            annotation = annotation | None
        parameters.append(
            inspect.Parameter(
                field.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation
            )
        )
    return parameters


def from_values(cls: type, values: dict[str, Any]) -> Any:
    """The options object from a command's parsed values (an unset list option is its empty
    default; a field with a text form is read from its text here, once)."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    given = {}
    for name, value in values.items():
        field = fields[name]
        form = field.metadata.get("text")
        if form is not None and isinstance(value, str):
            value = form.parse(flag_of(field), value)
        elif form is not None and isinstance(value, (list, tuple)):
            value = tuple(value)
        elif value is None and field.default_factory is not REQUIRED:
            value = field.default_factory()
        elif isinstance(value, tuple):
            value = list(value)
        given[name] = value
    return cls(**given)


# ----------------------------------------------------------------------------- types


def _type_name(kind: Any) -> str:
    names = {str: "a string or path", int: "a whole number", float: "a number",
             bool: "True or False"}  # fmt: skip
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        return (
            "a list of strings or paths" if typing.get_args(kind)[0] is str else "a list of numbers"
        )
    if origin is dict:
        return "a dict"
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def _typed_value(kind: Any, value: Any, form: TextForm | None, name: str) -> Any:
    """`value` as a field of type `kind` holds it (a path becomes its string, a whole-number
    float stays refused), or raises DeltakdError naming `name` and what it takes."""
    import os

    args = typing.get_args(kind)
    if type(None) in args:
        if value is None:
            return None
        (kind,) = [arg for arg in args if arg is not type(None)]
    if form is not None and isinstance(value, str):
        return form.parse(name, value)
    origin = typing.get_origin(kind)
    ok = False
    if kind is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        ok = isinstance(value, str)
    elif kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif origin is list and isinstance(value, (str, os.PathLike)):
        return [_typed_value(typing.get_args(kind)[0], value, None, name)]  # one of one or more
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        item = typing.get_args(kind)[0]
        try:
            items = [_typed_value(item, part, None, name) for part in value]
        except DeltakdError:
            items = None  # one wrong item: the message names the list
        if items is not None:
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        ok = isinstance(value, dict)
    else:
        ok = True  # a type this module does not know: the command checks it
    if not ok:
        shown = repr(value) if len(repr(value)) <= 40 else type(value).__name__
        raise DeltakdError(f"{name} takes {_type_name(kind)}, got {shown} ({type(value).__name__})")
    return value


def with_types(options: Any, name_of: Callable[[dataclasses.Field], str] = flag_of) -> Any:
    """`options` with every field of the type its annotation gives (a `pathlib.Path` where a
    path is taken becomes its string; a tuple of strings, a list); a value of another type
    (`"4"` or `1.5` or `True` for a whole number, None for a required path, a list for a path)
    raises one line naming the field (`name_of`: its flag, or its keyword for the API), before
    any work. What the command line gives is already typed; this is for values from code."""
    hints = _hints(type(options))
    changed = {}
    for field in dataclasses.fields(options):
        if not field.init:
            continue
        value = getattr(options, field.name)
        required = (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        if value is None and required:
            raise DeltakdError(f"{name_of(field)} is required; it is None")
        typed = _typed_value(hints[field.name], value, field.metadata.get("text"), name_of(field))
        if typed is not value:
            changed[field.name] = typed
    return dataclasses.replace(options, **changed) if changed else options


# ----------------------------------------------------------------------------- checks


FLOAT32_SAFE = 3.4e35  # float32's largest value / 1e3 (see `_number_problem`)


def _number_problem(value: float, meta: dict[str, Any]) -> str | None:
    low, high = meta.get("at_least"), meta.get("at_most")
    if meta.get("finite") and not math.isfinite(value):
        return "must be a finite number"
    if meta.get("finite") and abs(value) > FLOAT32_SAFE:
        # float64 on the command line, float32 in the optimizer: AdamW scales lr by moment
        # ratios up to ~1e3, so a larger lr overflows to inf at the first step
        return f"must be at most {FLOAT32_SAFE:.1e} (larger overflows float32 in training)"
    if low is not None and high is not None and not low <= value <= high:
        return f"must be between {low:g} and {high:g}"
    if low is not None and meta.get("below") is not None and not low <= value < meta["below"]:
        return f"must be in [{low:g}, {meta['below']:g})"
    if low is not None and not value >= low:
        return f"must be at least {low:g}" if low else "must be >= 0"
    if meta.get("above") is not None and not value > meta["above"]:
        return f"must be > {meta['above']:g}"
    if high is not None and not value <= high:
        return f"must be at most {high:g}"
    if meta.get("below") is not None and not value < meta["below"]:
        return f"must be below {meta['below']:g}"
    return None


# What a `local` path option is: its words in the refusal of a URL.
LOCAL_KINDS = {
    "output folder": ("writes a local folder", "outputs", "write locally, then copy"),
    "output file": ("writes a local file", "outputs", "write locally, then copy"),
    "input folder": ("reads local folders", "inputs", "copy them here first"),
}


def local_location(command: str, name: str, value: str, kind: str) -> str:
    """A local path option's value as a local path: `file:///abs` is `/abs` (what a user means
    by it); any other URL (s3://, gs://, memory://...) is refused in one line naming the
    command and the scheme, so no local folder called `s3:` is ever made."""
    if value.startswith("file://"):
        return value[len("file://") :] or "/"
    scheme, separator, _ = value.partition("://")
    if separator and scheme and scheme.replace("+", "").replace("-", "").isalnum():
        does, what, advice = LOCAL_KINDS[kind]
        raise DeltakdError(
            f"{command} {name} {value}: {command} {does}; {scheme}:// {what} are not supported "
            f"({advice})"
        )
    return value


def command_of(options: Any) -> str:
    """The command an options object is for (its class's `command`), for messages."""
    return getattr(options, "command", None) or type(options).__name__.removesuffix("Options")


def check(options: Any, partial: bool = False) -> None:
    """Check every field's choices and bounds, and the local path options' values (`local`:
    a `file://` URL becomes its path here, once; any other URL is refused); the first problem
    raises one line naming the flag. Unset optional values (None) are not checked; a required
    one set to None (the Python API's `cache=None`) is named as missing, unless `partial` (a
    config file's options, shown before the rest is given)."""
    for field in option_fields(options):
        meta = field.metadata
        value = getattr(options, field.name)
        if value is None:
            if not partial and field.default is REQUIRED and field.default_factory is REQUIRED:
                raise DeltakdError(f"{flag_of(field)} is required; it is None")
            continue
        name = flag_of(field)
        if meta.get("local"):
            shown = meta.get("metavar") if meta.get("argument") else name
            paths = [
                local_location(command_of(options), shown, item, meta["local"])
                for item in (value if isinstance(value, list) else [value])
            ]
            setattr(options, field.name, paths if isinstance(value, list) else paths[0])
            continue
        choices = choices_of(field)
        if choices is not None and value not in choices:
            shown = ", ".join(str(c) for c in choices)
            raise DeltakdError(f"unknown {name} '{value}' (choose from {shown})")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            problem = _number_problem(value, meta)
            if problem:
                raise DeltakdError(f"{name} {problem}, got {value}")


# ----------------------------------------------------------------------------- records, argv


def record(options: Any) -> dict[str, Any]:
    """Every field, as plain data (what a run writes into its record)."""
    return dataclasses.asdict(options)


# The options that name a file or folder (or a Hub id, or a URL): what `absolute_paths` makes
# absolute in a record.
PATH_OPTIONS = frozenset((
    "cache", "student", "out", "data", "eval_data", "model", "teacher_base", "teacher_tuned",
    "heal_data", "source", "work_dir", "predictions", "train", "test", "validation", "dirs",
    "dir", "student_from", "wheel_dir", "template_from",
))  # fmt: skip
# What a record says of its paths (its "paths" key).
PATHS_ARE = "absolute"


def _absolute(value: Any, output: bool) -> Any:
    if not isinstance(value, str) or not value or "://" in value:
        return value
    path = Path(value)
    if path.is_absolute() or not (path.exists() or output):
        return value  # a Hub id (or a path that is not there: kept as given)
    return str(path.resolve())


def absolute_paths(
    values: dict[str, Any], cls: type | None = None, keep: Sequence[str] = ()
) -> dict[str, Any]:
    """A record's options (of the options class `cls`) with every local path absolute
    (resolved against the working directory), so the record reads back as a config from any
    directory; a Hub id, a URL, a path that does not exist (an output excepted), a field with
    choices (the pipeline's --template-from is a role) and the fields of `keep` stay as given."""
    chosen = {f.name for f in dataclasses.fields(cls) if f.metadata.get("choices")} if cls else ()
    result = dict(values)
    for name, value in values.items():
        if name not in PATH_OPTIONS or name in keep or name in chosen:
            continue
        output = name in ("out", "work_dir")
        if isinstance(value, list):
            result[name] = [_absolute(item, output) for item in value]
        else:
            result[name] = _absolute(value, output)
    return result


def to_argv(options: Any, *, skip_defaults: bool = True) -> list[str]:
    """The command-line arguments that give `options` (positional arguments first). Fields at
    their default are left out, so a stage's command line shows what it sets."""
    positional, named = [], []
    for field in option_fields(options):
        value = getattr(options, field.name)
        default = field.default if field.default is not REQUIRED else REQUIRED
        if field.default_factory is not REQUIRED:
            default = field.default_factory()
        if skip_defaults and default is not REQUIRED and value == default:
            continue
        if field.metadata.get("argument"):
            items = value if isinstance(value, (list, tuple)) else [value]
            positional += [str(item) for item in items]  # a list argument takes one or more
            continue
        name = flag_of(field)
        form = field.metadata.get("text")
        if form is not None and value is not None:
            named += [name, form.show(value)]
        elif isinstance(value, bool):
            flags = field.metadata.get("flags")
            if value:
                named.append(flags[0] if flags else name)
            elif not flags and field.default is True:  # only an on-by-default flag has --no-x
                named.append("--no-" + name[2:])
        elif isinstance(value, (list, tuple)):
            for item in value:
                named += [name, str(item)]
        elif value is not None:
            named += [name, str(value)]
    return positional + named
