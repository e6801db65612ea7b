"""Config files: `--config FILE` on every command, and `deltakd config show COMMAND`.

A config is a YAML (or JSON) mapping whose keys are the command's option names (`max_length`
or `max-length`); `pipeline` also takes them nested per stage (`eval: {limit: 100}` for
`--eval-limit`, as each field's `section`/`key` says). The record a run writes (`OUT/run.json`,
a pipeline's `summary.json`, an eval's REPORT.json) is a config too: its `options` are read and
its `command` must be this one. Flags given on the command line win over the file.

Values are checked against the option's type here (naming the key and the type it wants);
bounds and choices are checked by the command like any flag. Nothing in a config runs: it is
read with yaml.safe_load or json."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deltakd_cli.errors import DeltakdError
from deltakd_cli.options import REQUIRED, flag_of, help_with_choices, option_fields

STAGE_OPTIONS = "stage_options"  # the field that holds a pipeline's per-stage settings
MISSING_YAML = "reading YAML configs needs PyYAML (a dependency of deltakd): pip install pyyaml"
TOOL = "deltakd"


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:  # transformers depends on it, so this is rare
        raise DeltakdError(MISSING_YAML) from None
    return yaml


# ----------------------------------------------------------------------------- keys


def _flag_key(field: dataclasses.Field) -> str:
    """The field's flag as a key: `--student-from` is `student_from`."""
    return flag_of(field).removeprefix("--").replace("-", "_")


def section_of(field: dataclasses.Field) -> tuple[str | None, str]:
    """(section, key) of a field in a nested config: the key is the field's flag, less its
    section's name where the flag starts with it (`--eval-limit` is `eval.limit`,
    `--finetune-lr` is `finetune.lr`, `--student-seeds` is `distill.student_seeds`); a field
    without a section is a top-level key of its own name."""
    section = field.metadata.get("section")
    key = _flag_key(field)
    if section and key.startswith(section + "_"):
        key = key[len(section) + 1 :]
    return section, key


def stage_option_of(field: dataclasses.Field) -> tuple[str | None, str]:
    """(section, the option of that section's stage the field sets): `--student-from` sets
    init-student's `source`, `--eval-limit` eval's `limit`."""
    section = field.metadata.get("section")
    name = field.metadata.get("key") or field.name
    if section and not field.metadata.get("key") and name.startswith(section + "_"):
        name = name[len(section) + 1 :]  # finetune_lr is finetune's lr
    return section, name


def config_keys(cls: type) -> dict[str, str]:
    """Every key a config for `cls` may use -> the field it sets: its flag's name (what `show`
    writes), the field's own name (so a run's flat record reads back) and, for a field in a
    section, `section.key`."""
    keys = {field.name: field.name for field in dataclasses.fields(cls)}
    for field in dataclasses.fields(cls):
        section, key = section_of(field)
        if section:
            keys[f"{section}.{key}"] = field.name
        keys.setdefault(_flag_key(field), field.name)  # its flag, at the top level
    return keys


def old_keys(cls: type) -> dict[str, str]:
    """Keys of earlier releases that named a field by its stage's option rather than its flag
    (`init_student.source` for `--student-from`, `distill.seeds` for `--student-seeds`) ->
    today's key; still read, with a note."""
    renamed = {}
    for field in dataclasses.fields(cls):
        section, key = section_of(field)
        _, old = stage_option_of(field)
        if section and old != key:
            renamed[f"{section}.{old}"] = f"{section}.{key}"
    return renamed


def sections(cls: type) -> set[str]:
    return {s for s, _ in map(section_of, dataclasses.fields(cls)) if s} | set(stage_classes(cls))


def stage_classes(cls: type) -> dict[str, type]:
    """The config sections of `cls` that hold a stage's own options (the pipeline's
    STAGE_SECTIONS: `cache: {precision: float32}`), section -> that stage's options class."""
    return dict(getattr(cls, "STAGE_SECTIONS", {}))


def _stage_option(cls: type, key: str) -> tuple[str, str] | None:
    """(section, option) when `key` is `section.name` for an option of a stage's own class."""
    section, _, name = key.partition(".")
    stage = stage_classes(cls).get(section)
    if stage is None or name not in {f.name for f in option_fields(stage)}:
        return None
    return section, name


def _normal(key: Any) -> str:
    return str(key).strip().replace("-", "_")


def _flatten(values: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """A (possibly nested) config as `key` / `section.key` -> value."""
    known_sections = sections(cls)
    flat: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = _normal(raw_key)
        if key == STAGE_OPTIONS and isinstance(value, Mapping):  # a pipeline's record
            for section, inner in value.items():
                if isinstance(inner, Mapping):
                    flat.update({f"{section}.{_normal(k)}": v for k, v in inner.items()})
        elif key in known_sections and isinstance(value, Mapping):
            for inner_key, inner in value.items():
                flat[f"{key}.{_normal(inner_key)}"] = inner
        else:
            flat[key] = value
    return flat


# ----------------------------------------------------------------------------- types


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(names) + " (or null)"
    if origin is list:
        return "a list of strings"
    if origin is tuple:
        return "a list of numbers"
    if origin is dict:
        return "a mapping"
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
    }.get(hint, str(hint))


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as the type `hint`, or raise ValueError. YAML 1.1 reads `1e-4` as a string, so
    a float option takes a string that is a number."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        arguments = typing.get_args(hint)
        if value is None and type(None) in arguments:
            return None
        for argument in arguments:
            if argument is type(None):
                continue
            try:
                return _coerce(value, argument)
            except ValueError:
                continue
        raise ValueError
    if value is None:
        raise ValueError
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise ValueError
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, list) and all(_scalar(item) for item in value):
            return ",".join(str(item) for item in value)  # `seeds: [10, 20]` is "10,20"
        raise ValueError
    if origin is tuple:  # a typed list of numbers: [0, 0.5] here, or "0,0.5" read by its flag
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(_scalar(item) for item in value):
            return tuple(float(item) for item in value)
        raise ValueError
    if origin is list:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(_scalar(item) for item in items):
            return [str(item) for item in items]
        raise ValueError
    if origin is dict:
        if isinstance(value, Mapping):
            return {str(k): str(v) for k, v in value.items()}
        raise ValueError
    raise ValueError


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    if _expanded_size(value) > 1000:  # never build a huge string to show a few characters
        return f"a {type(value).__name__} of {_expanded_size(value):,} values"
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


# YAML aliases share one object under many names: a few lines can stand for billions of values
# (an "alias bomb"). A config larger than this once expanded is refused.
MAX_EXPANDED_VALUES = 100_000


def _expanded_size(value: Any, seen: dict[int, int] | None = None) -> int:
    """How many values `value` stands for with every alias expanded; each shared object is
    counted once per use, in time proportional to the distinct objects."""
    seen = {} if seen is None else seen
    if not isinstance(value, (dict, list)):
        return 1
    key = id(value)
    if key in seen:
        return seen[key]
    seen[key] = MAX_EXPANDED_VALUES + 1  # a cycle (a recursive alias) counts as too large
    children = value.values() if isinstance(value, dict) else value
    total = 1
    for child in children:
        total += _expanded_size(child, seen)
        if total > MAX_EXPANDED_VALUES:
            break
    seen[key] = min(total, MAX_EXPANDED_VALUES + 1)
    return seen[key]


# ----------------------------------------------------------------------------- reading


def read_mapping(path: Path) -> dict[str, Any]:
    """The file's top-level mapping (JSON for .json, else YAML), or one line saying why not."""
    if not path.is_file():
        raise DeltakdError(f"config {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DeltakdError(f"config {path} is not a text file") from None
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise DeltakdError(
                f"config {path} is not valid JSON: line {error.lineno}, column {error.colno}: "
                f"{error.msg}"
            ) from None
    else:
        yaml = _yaml()
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise DeltakdError(f"config {path} is not valid YAML: {where}{problem}") from None
    if values is None:
        return {}
    if _expanded_size(values) > MAX_EXPANDED_VALUES:
        raise DeltakdError(
            f"config {path} stands for more than {MAX_EXPANDED_VALUES:,} values once its YAML "
            "aliases are expanded; a config is a few option values: write them out"
        )
    if not isinstance(values, dict):
        raise DeltakdError(
            f"config {path} must be a mapping of option names to values, "
            f"got {type(values).__name__}"
        )
    return values


def _is_record(values: Mapping[str, Any]) -> bool:
    """A file a deltakd run wrote (run.json, summary.json, REPORT.json, a cache manifest)."""
    tool = values.get("tool")
    name = tool.get("name") if isinstance(tool, Mapping) else tool
    return name == TOOL and isinstance(values.get("options"), Mapping)


def load(
    path: Path, command: str, cls: type, others: Mapping[str, type] | None = None
) -> dict[str, Any]:
    """The option values a config file sets for `command` (field name -> value of the field's
    type). A run's record gives its `options`. Unknown keys, wrong types and a config meant for
    another command are refused with one line."""
    values = read_mapping(path)
    if _is_record(values):
        recorded = values.get("command")
        if recorded and recorded != command:
            raise DeltakdError(
                f"{path} is the record of a '{recorded}' run, not '{command}': "
                f"use it with deltakd {recorded} --config {path}"
            )
        values = dict(values["options"])
    else:
        values = dict(values)
        named = values.pop("command", None)
        if named is not None and named != command:
            raise DeltakdError(
                f"config {path} is for 'deltakd {named}', not 'deltakd {command}' "
                "(its 'command' key says so)"
            )
    flat = _flatten(values, cls)
    keys = config_keys(cls)
    for old, new in old_keys(cls).items():
        if old in flat and new not in flat:
            logging.getLogger(TOOL).warning(
                f"note: config {path}: '{old}' is now '{new}' (the flag's name); "
                "the old key is read for now"
            )
            flat[new] = flat.pop(old)
    staged = {key: _stage_option(cls, key) for key in flat if key not in keys}
    staged = {key: where for key, where in staged.items() if where}
    unknown = [key for key in flat if key not in keys and key not in staged]
    if unknown:
        raise DeltakdError(_unknown_key_message(path, command, unknown, values, keys, others))
    hints = typing.get_type_hints(cls)
    required = {f.name for f in option_fields(cls) if _required(f)}
    given: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, (section, name) in staged.items():
        stage = stage_classes(cls)[section]
        try:
            value = _coerce(flat[key], typing.get_type_hints(stage)[name])
        except ValueError:
            hint = _type_name(typing.get_type_hints(stage)[name])
            raise DeltakdError(
                f"config {path}: '{key}' must be {hint}, got {_shown(flat[key])}"
            ) from None
        given.setdefault(STAGE_OPTIONS, {}).setdefault(section, {})[name] = value
    for key, value in flat.items():
        if key in staged:
            continue
        name = keys[key]
        if value is None and name in required:
            continue  # `show` writes a required option as null: still to be given
        if name in given and where[name] != key:
            raise DeltakdError(
                f"config {path} sets {name!r} twice (as '{where[name]}' and '{key}')"
            )
        try:
            given[name] = _coerce(value, hints[name])
        except ValueError:
            raise DeltakdError(
                f"config {path}: '{key}' must be {_type_name(hints[name])}, got {_shown(value)}"
            ) from None
        where[name] = key
    return given


def _unknown_key_message(
    path: Path,
    command: str,
    unknown: list[str],
    values: Mapping[str, Any],
    keys: Mapping[str, str],
    others: Mapping[str, type] | None,
) -> str:
    key = unknown[0]
    for other, other_cls in (others or {}).items():
        other_keys = config_keys(other_cls)
        if other != command and all(k in other_keys for k in _flatten(values, other_cls)):
            return (
                f"config {path} looks like a config for 'deltakd {other}': "
                f"'{key}' is not an option of 'deltakd {command}'"
            )
    close = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"see: deltakd config show {command}"
    return f"config {path}: unknown key '{key}' for 'deltakd {command}' ({hint})"


# ----------------------------------------------------------------------------- merging


def merge(
    cls: type,
    command_line: Mapping[str, Any],
    given_on_command_line: set[str],
    from_config: Mapping[str, Any],
) -> dict[str, Any]:
    """The values of every field: a flag given on the command line, else the config's value,
    else the flag's default (what the command line parsed). A required option given nowhere is
    one line naming its flag."""
    values = dict(command_line)
    # Options that are one choice (--test or --test-rows): the one the command line gives
    # replaces the config's choice.
    replaced = {
        name
        for choice in getattr(cls, "ALTERNATIVES", ())
        if given_on_command_line & set(choice)
        for name in choice
    }
    for name, value in from_config.items():
        if name not in given_on_command_line and name not in replaced:
            values[name] = value
    for field in option_fields(cls):
        if _required(field) and values.get(field.name) in (None, [], ()):
            if field.metadata.get("argument"):
                what = (field.metadata.get("metavar") or field.name.upper()) + "..."
                raise DeltakdError(
                    f"missing argument {what} (give it, or '{field.name}:' in --config)"
                )
            flags = field.metadata.get("flags")
            flag = flags[0] if flags else "--" + field.name.replace("_", "-")
            raise DeltakdError(f"missing option {flag} (give it, or '{field.name}:' in --config)")
    return values


# ----------------------------------------------------------------------------- showing


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and "e" in repr(value) and "." not in repr(value):
        return repr(value).replace("e", ".0e")  # YAML 1.1 reads 2e-05 as a string, 2.0e-05 not
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    text = str(value)
    return json.dumps(text) if _needs_quotes(text) else text


def _needs_quotes(text: str) -> bool:
    if (
        not text
        or text.strip() != text
        or text.lower() in ("null", "true", "false", "yes", "no", "on", "off", "~")
    ):
        return True
    if any(ch in text for ch in ":#{}[],&*!|>'\"%@`"):
        return True
    try:
        float(text)
        return True
    except ValueError:
        return False


def _required(field: dataclasses.Field) -> bool:
    return field.default is REQUIRED and field.default_factory is REQUIRED


def _comment(field: dataclasses.Field) -> str:
    help_text = help_with_choices(field)
    required = _required(field)
    parts = [help_text] if help_text else []
    if required:
        parts.append("(required)")
    return " ".join(parts)


def show(command: str, cls: type, values: Mapping[str, Any] | None = None) -> str:
    """The config of `command` as commented YAML: every option with its default (or the given
    values), nested per section for `pipeline`. Feeding it back with --config changes nothing."""
    values = dict(values or {})
    doc = " ".join((cls.__doc__ or "").split())
    lines = [
        f"# deltakd {command}: {doc}",
        f"# Use with: deltakd {command} --config FILE.yaml (flags on the command line win).",
        "command: " + command,
    ]
    by_section: dict[str | None, list[dataclasses.Field]] = {}
    for field in option_fields(cls):
        by_section.setdefault(section_of(field)[0], []).append(field)
    for section, fields in by_section.items():
        indent = ""
        if section:
            lines += ["", f"{section}:"]
            indent = "  "
        for field in fields:
            if field.name in values:
                value = values[field.name]
            elif field.default is not REQUIRED:
                value = field.default
            elif field.default_factory is not REQUIRED:
                value = field.default_factory()
            else:
                value = None
            comment = _comment(field)
            if comment:
                lines.append(f"{indent}# {comment}")
            lines.append(f"{indent}{section_of(field)[1]}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n"
