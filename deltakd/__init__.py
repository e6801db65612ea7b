"""deltakd's Python API: the stages of the command line as functions.

    import deltakd

    cache = deltakd.cache_teachers(teacher_base="base", teacher_tuned="tuned",
                                   student="student", data="train.jsonl", out="cache")
    run = deltakd.distill(cache="cache", student="student", out="student-delta")
    result = deltakd.evaluate(model={"delta": "student-delta"}, data="test.jsonl")
    print(result.table())

Each function takes its options as keyword arguments, named as the command's options with
underscores (`max_steps`, not `--max-steps`; `deltakd config show COMMAND` lists them), or one
options dataclass of that command; it returns a typed result (results.py: `Cache`, `Run`,
`Evaluation`, `Pipeline`, `Report`, `Pushed`), each with the file's whole record as `.record`.
A path may be a str or a pathlib.Path; a model argument may also be a `(model, tokenizer)`
pair of transformers objects, saved to a temporary directory first (deltakd records models by
the hash of their files). A value of the wrong type, like any other problem, raises
`deltakd.DeltakdError` with one line that names options as here (`max_steps`), never as
flags, before any work.

The functions print nothing: what the command line prints goes to the "deltakd" logger
(`logging.getLogger("deltakd")`, INFO), and `verbose=True` prints it as the command line does.
A stage reruns as on the command line: complete and identical work is skipped, different
settings over a finished output are refused, and `overwrite=` / `resume=` say otherwise.

Importing deltakd loads nothing heavy: torch and transformers are imported when a stage runs.
docs/api.md has a worked example (tests/test_api.py runs it)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from deltakd.results import (
    Cache,
    Difference,
    Evaluation,
    GroupScore,
    ModelScore,
    Pipeline,
    PipelineRow,
    Pushed,
    Report,
    Run,
)
from deltakd_cli import __version__
from deltakd_cli.errors import DeltakdError, Interrupted

__all__ = [
    "Cache",
    "DeltakdError",
    "Difference",
    "Evaluation",
    "GroupScore",
    "Interrupted",
    "ModelScore",
    "Pipeline",
    "PipelineRow",
    "Pushed",
    "Report",
    "Run",
    "__version__",
    "cache_teachers",
    "distill",
    "evaluate",
    "finetune",
    "inspect",
    "options_of",
    "pipeline",
    "push",
    "report",
]

# The options that name a model (a path or Hub id, or a (model, tokenizer) pair here).
MODEL_OPTIONS = ("student", "model", "teacher_base", "teacher_tuned", "template_from")


def options_of(command: str, **values: Any) -> Any:
    """The options dataclass of a command (its CLI name: "distill", "cache-teachers", ...)
    built from keyword arguments, each of its field's type (a pathlib.Path where a path is
    taken is its string); an unknown name or a value of the wrong type raises DeltakdError
    naming the keyword."""
    from deltakd_cli.commands import BY_NAME
    from deltakd_cli.options import with_types

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
    return with_types(cls(**values), name_of=lambda field: field.name)


def _unflagged(message: str, options: Any) -> str:
    """A CLI-worded message with every flag of `options` written as its keyword (`--max-steps`
    -> `max_steps`; `--out REPORT.json` -> `out=REPORT.json`)."""
    from deltakd_cli.options import flag_of

    names = {flag_of(field): field.name for field in dataclasses.fields(options)}
    for field in dataclasses.fields(options):
        for alias in field.metadata.get("aliases", ()):
            names[alias] = field.name
    message = re.sub(
        r"(?<![\w-])(--[a-z0-9][a-z0-9-]*) ([A-Z][A-Z_.]+)\b",
        lambda m: f"{names[m.group(1)]}={m.group(2)}" if m.group(1) in names else m.group(0),
        message,
    )
    return re.sub(
        r"--[a-z0-9][a-z0-9-]*", lambda match: names.get(match.group(0), match.group(0)), message
    )


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and hasattr(value[0], "save_pretrained")


def _saved_models(values: dict[str, Any], stack: ExitStack) -> dict[str, Any]:
    """`values` with every (model, tokenizer) pair saved to a temporary directory (removed when
    the stage ends) and replaced by its path; any other tuple is refused."""
    result = dict(values)
    for name in MODEL_OPTIONS:
        value = values.get(name)
        items = value if isinstance(value, list) else [value]
        paths = []
        for item in items:
            if _is_pair(item):
                directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="deltakd-"))
                item[0].save_pretrained(directory)
                item[1].save_pretrained(directory)
                paths.append(directory)
            elif isinstance(item, tuple):
                raise DeltakdError(
                    f"{name} takes a path, a Hub id or a (model, tokenizer) pair of transformers "
                    f"objects, got {item!r}"[:200]
                )
            else:
                paths.append(item)
        if value is not None:
            result[name] = paths if isinstance(value, list) else paths[0]
    return result


@contextlib.contextmanager
def _output(verbose: bool) -> Iterator[None]:
    """Quiet unless `verbose`: the console (status lines, progress, tables) says nothing and
    stdout is kept; the status lines still reach the "deltakd" logger (console.info)."""
    if verbose:
        yield
        return
    from transformers.utils import logging as transformers_logging

    from deltakd_cli.console import console

    quiet, bars = console.quiet, transformers_logging.is_progress_bar_enabled()
    console.quiet = True
    transformers_logging.disable_progress_bar()  # its "Loading weights" bars, on stderr
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        console.quiet = quiet
        if bars:
            transformers_logging.enable_progress_bar()


def _run(command: str, options: Any, values: dict[str, Any]) -> Any:
    from deltakd_cli.commands import BY_NAME, run_command
    from deltakd_cli.options import with_types

    verbose = values.pop("verbose", False)
    if not isinstance(verbose, bool):
        raise DeltakdError(f"verbose takes True or False, got {verbose!r}")
    cls = BY_NAME[command].options
    if options is not None and type(options) is not cls:
        what = type(options).__name__
        raise DeltakdError(
            f"{command} takes keyword arguments ({command.replace('-', '_')}(out=..., ...)) or "
            f"one {cls.__name__} (deltakd.options_of({command!r}, ...)), got a {what} "
            "as its first argument"
        )
    with ExitStack() as stack:
        if options is None:
            options = options_of(command, **_saved_models(values, stack))
        elif values:
            raise DeltakdError("give an options object or keyword arguments, not both")
        else:
            options = with_types(options, name_of=lambda field: field.name)
        try:
            with _output(verbose), _keywords_in_log(options):
                return run_command(command, options)
        except DeltakdError as error:
            raise type(error)(_unflagged(str(error), options)) from None


@contextlib.contextmanager
def _keywords_in_log(options: Any) -> Iterator[None]:
    """While a stage runs, what it logs names options as keywords too ("not saved: add
    out=REPORT.json ..."), as its errors do."""

    def reword(record: logging.LogRecord) -> bool:
        record.msg, record.args = _unflagged(record.getMessage(), options), None
        return True

    logger = logging.getLogger("deltakd")
    logger.addFilter(reword)
    try:
        yield
    finally:
        logger.removeFilter(reword)


def _record_of(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def cache_teachers(options: Any = None, /, **values: Any) -> Cache:
    """Run the base and the tuned teacher over the data once and write the sparse cache
    (`deltakd cache-teachers`); returns the cache (its manifest, typed). An output already
    complete for the same settings is kept (`skipped`)."""
    out = getattr(options, "out", None) if options is not None else values.get("out")
    manifest_path = Path(os.fspath(out)) / "manifest.json" if isinstance(out, (str, Path)) else None
    before = manifest_path and _record_of(manifest_path)
    manifest = _run("cache-teachers", options, values)
    after = manifest_path and _record_of(manifest_path)
    skipped = before is not None and before == after
    if after is not None:
        manifest = json.loads(after)  # as on disk (its own checksum included)
    return Cache.from_record(manifest, os.fspath(out), skipped)


def _train(command: str, options: Any, values: dict[str, Any]) -> Run:
    out = getattr(options, "out", None) if options is not None else values.get("out")
    run_path = Path(os.fspath(out)) / "run.json" if isinstance(out, (str, Path)) else None
    before = run_path and _record_of(run_path)
    record = _run(command, options, values)
    skipped = before is not None and before == _record_of(run_path)
    return Run.from_record(record, os.fspath(out), skipped)


def distill(options: Any = None, /, **values: Any) -> Run:
    """Train the student from a teachers' cache (`deltakd distill`); returns the run (what
    OUT/run.json holds, typed). The same run again is skipped (`skipped`); a finished run of
    other settings is refused unless `overwrite=True` (or `resume=True` trains it further)."""
    return _train("distill", options, values)


def finetune(options: Any = None, /, **values: Any) -> Run:
    """Supervised finetuning (`deltakd finetune`); returns the run, as `distill` does."""
    return _train("finetune", options, values)


def _labelled(value: Any) -> Any:
    """evaluate's `model`: one model, a list, or a dict {label: model} (-> NAME=MODEL)."""
    if isinstance(value, dict):
        return [(label, model) for label, model in value.items()]
    if isinstance(value, (str, os.PathLike)) or _is_pair(value):
        return [value]
    return value


def _group_texts(value: Any) -> Any:
    """evaluate's `group`: a dict {name: [models] or "m1,m2"}, or the CLI's NAME=M1,M2 texts."""
    if not isinstance(value, dict):
        return value
    texts = []
    for name, members in value.items():
        if isinstance(members, (str, os.PathLike)):
            members = [members]
        if not isinstance(members, (list, tuple)):
            raise DeltakdError(f"group {name!r} takes a list of models, got {members!r}")
        texts.append(f"{name}=" + ",".join(os.fspath(member) for member in members))
    return texts


def _compare_texts(value: Any) -> Any:
    """evaluate's `compare`: pairs (A, B) (A minus B), a dict {A: B}, or the CLI's A:B texts."""
    if isinstance(value, dict):
        value = list(value.items())
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value):
        value = [value]
    if isinstance(value, list):
        return [f"{item[0]}:{item[1]}" if isinstance(item, tuple) and len(item) == 2 else item
                for item in value]  # fmt: skip
    return value


def evaluate(options: Any = None, /, **values: Any) -> Evaluation:
    """Generate and score ROUGE-L, models side by side (`deltakd eval`); returns the report,
    typed. `model` is one model, a list, or a dict {label: model}; `group` a dict {name:
    [models]}; `compare` pairs (A, B), A minus B (the CLI's strings are taken too)."""
    if "model" in values:
        models = _labelled(values["model"])
        if isinstance(models, list) and any(isinstance(m, tuple) and not _is_pair(m)
                                            for m in models):  # fmt: skip
            with ExitStack() as stack:  # a labelled pair: saved while the stage runs
                return _evaluate_labelled(models, values, stack)
        values["model"] = models
    for name, convert in (("group", _group_texts), ("compare", _compare_texts)):
        if name in values:
            values[name] = convert(values[name])
    report = _run("eval", options, values)
    out = getattr(options, "out", None) if options is not None else values.get("out")
    return Evaluation.from_record(report, Path(os.fspath(out)) if out is not None else None)


def _evaluate_labelled(models: list[Any], values: dict[str, Any], stack: ExitStack) -> Evaluation:
    specs = []
    for item in models:
        if isinstance(item, tuple) and not _is_pair(item):
            label, model = item
            if _is_pair(model):
                model = _saved_models({"model": model}, stack)["model"]
            if not isinstance(label, str) or not isinstance(model, (str, os.PathLike)):
                raise DeltakdError(f"model takes {{label: path}}, got {label!r}: {model!r}")
            specs.append(f"{label}={os.fspath(model)}")
        else:
            specs.append(item)
    return evaluate(**{**values, "model": specs})


def pipeline(options: Any = None, /, **values: Any) -> Pipeline:
    """Every stage in one folder (`deltakd pipeline`); returns its summary, typed."""
    summary = _run("pipeline", options, values)
    return Pipeline.from_record(summary, summary["options"]["out"])


def report(options: Any = None, /, **values: Any) -> Report:
    """The report page of runs, eval reports and pipeline folders (`deltakd report`): `dirs`
    (a list, or one) and `out`; returns where it is."""
    if isinstance(values.get("dirs"), (str, os.PathLike)):
        values["dirs"] = [values["dirs"]]
    page = Path(_run("report", options, values))
    return Report(path=page.parent, page=page)


def inspect(options: Any = None, /, **values: Any) -> dict[str, Any]:
    """A cache's summary, as `deltakd inspect --json` prints it (with `verify=True`, its shards
    checked; with `example=N`, that example decoded)."""
    result = _run("inspect", options, values)
    return json.loads(json.dumps(result))


def push(options: Any = None, /, **values: Any) -> Pushed:
    """Upload a model directory (`dir`) to the Hub repository `repo` (`deltakd push`)."""
    files = _run("push", options, values)
    repo = options.repo if options is not None else os.fspath(values["repo"])
    return Pushed(repo=repo, url=f"https://huggingface.co/{repo}", files=list(files))
