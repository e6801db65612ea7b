"""deltakd's Python API: the stages of the command line as functions.

    import deltakd

    manifest = deltakd.cache_teachers(teacher_base="base", teacher_tuned="tuned",
                                      student="student", data="train.jsonl", out="cache")
    run = deltakd.distill(cache="cache", student="student", out="student-delta")
    report = deltakd.evaluate(model=["student-delta"], data="test.jsonl")

Each function takes its options as keyword arguments, named as the command's options with
underscores (`max_steps`, not `--max-steps`; `deltakd config show COMMAND` lists them), or one
options dataclass; it returns what the stage records (the cache's manifest, the run's record,
the eval report, the pipeline's summary). A model argument may be a path or Hub id, or a
`(model, tokenizer)` pair of transformers objects, which is saved to a temporary directory first
(deltakd records models by the hash of their files). Problems raise `deltakd.DeltakdError` with
one line that names options as here (`max_steps`), never as flags.

Importing deltakd loads nothing heavy: torch and transformers are imported when a stage runs.
docs/api.md has a worked example (tests/test_api.py runs it)."""

from __future__ import annotations

import dataclasses
import re
import tempfile
from contextlib import ExitStack
from typing import Any

from deltakd_cli import __version__
from deltakd_cli.errors import DeltakdError, Interrupted

__all__ = [
    "DeltakdError",
    "Interrupted",
    "__version__",
    "cache_teachers",
    "distill",
    "evaluate",
    "finetune",
    "options_of",
    "pipeline",
]

# The options that name a model (a path or Hub id, or a (model, tokenizer) pair here).
MODEL_OPTIONS = ("student", "model", "teacher_base", "teacher_tuned", "template_from")


def options_of(command: str, **values: Any) -> Any:
    """The options dataclass of a command (its CLI name: "distill", "cache-teachers", ...)
    built from keyword arguments; unknown names raise DeltakdError naming the known ones."""
    from deltakd_cli.commands import BY_NAME

    if command not in BY_NAME:
        raise DeltakdError(f"no stage {command!r}; the stages are {', '.join(BY_NAME)}")
    cls = BY_NAME[command].options
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise DeltakdError(
            f"{command} has no option {unknown[0]!r}; its options: {', '.join(sorted(fields))}"
        )
    missing = [
        name
        for name, field in fields.items()
        if field.default is dataclasses.MISSING
        and field.default_factory is dataclasses.MISSING
        and name not in values
    ]
    if missing:
        raise DeltakdError(f"{command} needs {', '.join(missing)}")
    return cls(**values)


def _unflagged(message: str, options: Any) -> str:
    """A CLI-worded message with every flag of `options` written as its keyword (`--max-steps`
    -> `max_steps`)."""
    from deltakd_cli.options import flag_of

    names = {flag_of(field): field.name for field in dataclasses.fields(options)}
    return re.sub(
        r"--[a-z0-9][a-z0-9-]*", lambda match: names.get(match.group(0), match.group(0)), message
    )


def _saved_models(values: dict[str, Any], stack: ExitStack) -> dict[str, Any]:
    """`values` with every (model, tokenizer) pair saved to a temporary directory (removed when
    the stage ends) and replaced by its path."""
    result = dict(values)
    for name in MODEL_OPTIONS:
        value = values.get(name)
        pairs = value if isinstance(value, list) else [value]
        paths = []
        for item in pairs:
            if isinstance(item, tuple) and len(item) == 2 and hasattr(item[0], "save_pretrained"):
                directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="deltakd-"))
                item[0].save_pretrained(directory)
                item[1].save_pretrained(directory)
                paths.append(directory)
            else:
                paths.append(item)
        if value is not None:
            result[name] = paths if isinstance(value, list) else paths[0]
    return result


def _run(command: str, options: Any, values: dict[str, Any]) -> Any:
    from deltakd_cli.commands import run_command

    with ExitStack() as stack:
        if options is None:
            options = options_of(command, **_saved_models(values, stack))
        elif values:
            raise DeltakdError("give an options object or keyword arguments, not both")
        try:
            return run_command(command, options)
        except DeltakdError as error:
            raise type(error)(_unflagged(str(error), options)) from None


def cache_teachers(options: Any = None, /, **values: Any) -> dict[str, Any]:
    """Run the base and the tuned teacher over the data once and write the sparse cache
    (`deltakd cache-teachers`); returns its manifest."""
    return _run("cache-teachers", options, values)


def distill(options: Any = None, /, **values: Any) -> dict[str, Any]:
    """Train the student from a teachers' cache (`deltakd distill`); returns the run's record
    (what OUT/run.json holds)."""
    return _run("distill", options, values)


def finetune(options: Any = None, /, **values: Any) -> dict[str, Any]:
    """Supervised finetuning (`deltakd finetune`); returns the run's record."""
    return _run("finetune", options, values)


def evaluate(options: Any = None, /, **values: Any) -> dict[str, Any]:
    """Generate and score ROUGE-L, models side by side (`deltakd eval`); returns the report.
    `model` is a list (one or more models)."""
    if isinstance(values.get("model"), (str, tuple)):
        values["model"] = [values["model"]]
    return _run("eval", options, values)


def pipeline(options: Any = None, /, **values: Any) -> dict[str, Any]:
    """Every stage in one folder (`deltakd pipeline`); returns its summary."""
    return _run("pipeline", options, values)
