"""`--config FILE` and `deltakd config show`: a config gives the same options as the flags, flags
win over it, a run's record fed back reproduces the run, and bad configs are one clear line."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

import pytest
import yaml
from helpers import REPO, assert_one_line_error, flat, run_cli
from safetensors.torch import load_file

from deltakd_cli import cli, config
from deltakd_cli.commands import COMMANDS
from deltakd_cli.errors import DeltakdError
from deltakd_cli.options import REQUIRED, choices_of, option_fields, to_argv
from deltakd_cli.pipeline.options import PipelineOptions

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def captured(monkeypatch):
    """The options each command would run with (the command itself is not run)."""
    calls: list = []
    monkeypatch.setattr(cli, "run_command", lambda name, options: calls.append((name, options)))
    return calls


def _changed(field: dataclasses.Field, hint) -> object:
    """A value for `field` other than its default, of its type and within its choices."""
    default = field.default if field.default is not REQUIRED else None
    if field.default_factory is not REQUIRED:
        default = field.default_factory()
    choices = choices_of(field)
    if choices:
        return next(c for c in choices if c != default)
    kind = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(hint) if a is not type(None))
    if kind is bool:
        return not default
    if kind is int:
        return (default or 0) + 3
    if kind is float:
        return (default or 0.25) * 0.5 if default != 0 else 0.125
    if typing.get_origin(kind) is list:
        return ["first", "second"]
    if typing.get_origin(kind) is tuple:  # a number list (--gammas): typed floats
        return (0.125, 0.1234567)
    return f"value-of-{field.name}"


def _all_changed(cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    return {field.name: _changed(field, hints[field.name]) for field in option_fields(cls)}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_a_config_gives_the_same_options_as_the_flags(command, captured, tmp_path):
    values = _all_changed(command.options)
    expected = command.options(**values)
    assert run_cli([command.name, *to_argv(expected)]).exit_code == 0
    path = tmp_path / "config.yaml"
    path.write_text(config.show(command.name, command.options, values))
    result = run_cli([command.name, "--config", path])
    assert result.exit_code == 0, result.output
    assert [options for _, options in captured] == [expected, expected]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_config_show_fed_back_changes_nothing(command, tmp_path):
    shown = run_cli(["config", "show", command.name])
    assert shown.exit_code == 0, shown.output
    path = tmp_path / "defaults.yaml"
    path.write_text(shown.output)
    loaded = config.load(path, command.name, command.options)
    for field in option_fields(command.options):
        if field.default is not REQUIRED:
            assert loaded[field.name] == field.default, field.name
        elif field.default_factory is not REQUIRED:
            assert loaded[field.name] == field.default_factory(), field.name


def test_flags_given_on_the_command_line_win(captured, tmp_path):
    path = tmp_path / "distill.yaml"
    path.write_text("cache: c\nstudent: s\nout: o\nlr: 1e-4\nepochs: 3\nobjective: kd\n")
    result = run_cli(["distill", "--config", path, "--lr", "0.5", "--out", "elsewhere"])
    assert result.exit_code == 0, result.output
    ((_, options),) = captured
    assert (options.lr, options.out) == (0.5, "elsewhere")
    assert (options.epochs, options.objective) == (3, "kd")
    assert isinstance(options.lr, float)


def test_a_flag_given_at_its_default_still_wins(captured, tmp_path):
    path = tmp_path / "distill.yaml"
    path.write_text("cache: c\nstudent: s\nout: o\nepochs: 3\n")
    assert run_cli(["distill", "--config", path, "--epochs", "1"]).exit_code == 0
    assert captured[0][1].epochs == 1


def test_pipeline_keys_nest_per_stage(captured, tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "teacher_base": "tb", "student": "s", "train": "tr.jsonl", "test": "te.jsonl",
                "out": "o",
                "distill": {"alpha": 2.0, "lr": "3e-4", "student_seeds": [1, 2]},
                "eval": {"limit": 50, "protocol": "minillm", "batch_size": 4},
                "cache": {"top_k": 32},
                "finetune": {"epochs": 5},
            }
        )
    )  # fmt: skip
    result = run_cli(["pipeline", "--config", path])
    assert result.exit_code == 0, result.output
    ((_, options),) = captured
    assert (options.alpha, options.lr, options.student_seeds) == (2.0, 3e-4, "1,2")
    assert (options.eval_limit, options.protocol, options.eval_batch_size) == (50, "minillm", 4)
    assert (options.top_k, options.finetune_epochs) == (32, 5)


def test_config_keys_are_flag_names():
    """Every key `config show pipeline` writes is its option's flag (less the section's name it
    starts with: --eval-limit is eval.limit): --student-from is init_student.student_from, not
    init_student.source; --student-seeds is distill.student_seeds, not distill.seeds."""
    from deltakd_cli.options import flag_of

    shown = run_cli(["config", "show", "pipeline"]).output
    for field in option_fields(PipelineOptions):
        section, key = config.section_of(field)
        name = flag_of(field).removeprefix("--").replace("-", "_")
        assert key == (name.removeprefix(f"{section}_") if section else name), field.name
        assert f"{'  ' if section else ''}{key}:" in shown
    assert "  student_from: null" in shown and "  student_seeds: null" in shown
    distill = shown.split("\ndistill:")[1].split("\neval:")[0]
    assert "  source:" not in shown and "  seeds:" not in distill


def test_old_config_keys_still_read_with_a_note(captured, tmp_path, caplog):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "teacher_base": "tb", "train": "tr.jsonl", "test": "te.jsonl",
        "init_student": {"source": "big", "layers": 2}, "distill": {"seeds": "0,1"},
    }))  # fmt: skip
    with caplog.at_level("WARNING", logger="deltakd"):
        result = run_cli(["pipeline", "--config", path])
    assert result.exit_code == 0, result.output
    ((_, options),) = captured
    assert (options.student_from, options.student_layers) == ("big", 2)
    assert options.student_seeds == "0,1"
    notes = [record.getMessage() for record in caplog.records]
    assert any("'init_student.source' is now 'init_student.student_from'" in n for n in notes)
    assert any("'distill.seeds' is now 'distill.student_seeds'" in n for n in notes)


def test_test_on_the_command_line_replaces_a_configs_test_rows(captured, tmp_path):
    """--test and --test-rows are one choice: the command line's replaces the config's (before:
    'give --test or --test-rows, not both')."""
    path = tmp_path / "pipeline.yaml"
    path.write_text("teacher_base: tb\nstudent: s\ntrain: tr.jsonl\ntest_rows: 5\n")
    assert run_cli(["pipeline", "--config", path, "--test", "te.jsonl"]).exit_code == 0
    ((_, options),) = captured
    assert (options.test, options.test_rows) == ("te.jsonl", None)
    path.write_text("teacher_base: tb\nstudent_from: big\nstudent_layers: 2\ntrain: tr.jsonl\n"
                    "test: te.jsonl\n")  # fmt: skip
    assert (
        run_cli(["pipeline", "--config", path, "--student", "s", "--test-rows", "3"]).exit_code == 0
    )
    options = captured[1][1]
    assert (options.student, options.student_from, options.test, options.test_rows) == (
        "s", None, None, 3)  # fmt: skip


def test_the_example_configs_parse():
    examples = sorted((REPO / "examples").glob("*.yaml"))
    assert len(examples) >= 2
    for path in examples:
        values = config.load(path, "pipeline", PipelineOptions)
        merged = {field.name: field.default for field in option_fields(PipelineOptions)}
        PipelineOptions(**{**{k: v for k, v in merged.items() if v is not REQUIRED}, **values})


def test_the_demo_config_is_the_demo(captured):
    """examples/demo.yaml is the pipeline `deltakd demo` runs (on the assets it prepares under
    runs/demo), so a user can start from it."""
    from deltakd_cli.pipeline import assets
    from deltakd_cli.pipeline.demo import DEFAULT_PROFILE, demo_settings
    from deltakd_cli.pipeline.options import DemoOptions

    data = Path("runs/demo/data")
    prepared = {
        "base_model": "runs/demo/models/teacher-base",
        "model_source": {"sha256": "0" * 64},
        "data": assets.DemoData(
            data / "train.jsonl",
            data / "test.jsonl",
            data / "heal.jsonl",
            data / "sources.json",
            validation=data / "validation.jsonl",
        ),
    }
    demo = demo_settings(DemoOptions(), DEFAULT_PROFILE, prepared)
    result = run_cli(["pipeline", "--config", REPO / "examples" / "demo.yaml"])
    assert result.exit_code == 0, result.output
    ((_, options),) = captured
    assert options == dataclasses.replace(demo, input_keys={})


# ----------------------------------------------------------------------------- records


def test_a_run_record_fed_back_reproduces_the_weights(tiny, tmp_path):
    cache = tmp_path / "cache"
    result = run_cli(
        [
            "cache-teachers", "--teacher-base", tiny.teacher_base,
            "--teacher-tuned", tiny.teacher_tuned, "--data", tiny.train, "--out", cache,
            "--student", tiny.student, "--top-k", 8, "--device", "cpu",
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    first = tmp_path / "first"
    result = run_cli(
        [
            "distill", "--cache", cache, "--student", tiny.student, "--out", first,
            "--lr", "5e-3", "--batch-size", 4, "--max-steps", 3, "--objective", "delta",
            "--alpha", 2.0, "--num-workers", 0, "--device", "cpu",
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    second = tmp_path / "second"
    result = run_cli(["distill", "--config", first / "run.json", "--out", second])
    assert result.exit_code == 0, result.output
    weights = load_file(first / "model.safetensors")
    again = load_file(second / "model.safetensors")
    assert weights.keys() == again.keys()
    assert all(weights[name].equal(again[name]) for name in weights)
    assert json.loads((second / "run.json").read_text())["options"] == {
        **json.loads((first / "run.json").read_text())["options"],
        "out": str(second),
    }

    # The cache's manifest is the record of a cache-teachers run, not a distill config.
    result = run_cli(["distill", "--config", cache / "manifest.json", "--out", tmp_path / "x"])
    assert_one_line_error(result, "record of a 'cache-teachers' run", "deltakd cache-teachers")


def test_a_record_read_from_another_directory_finds_its_paths(tiny, tmp_path, monkeypatch):
    """Paths given relative to where a run ran are recorded absolute, and the record says so:
    `--config S/run.json` from another directory finds the cache (before: "cache not found")."""
    import os

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(work)
    student = os.path.relpath(tiny.student, work)
    assert run_cli(["cache-teachers", "--teacher-base", tiny.teacher_base, "--teacher-tuned",
                    tiny.teacher_tuned, "--data", os.path.relpath(tiny.train, work), "--out",
                    "cache", "--student", student, "--top-k", 8, "--device", "cpu"]
                   ).exit_code == 0  # fmt: skip
    args = ["distill", "--cache", "cache", "--student", student, "--out", "first", "--lr", "5e-3",
            "--batch-size", 4, "--max-steps", 2, "--num-workers", 0, "--device", "cpu"]  # fmt: skip
    assert run_cli(args).exit_code == 0
    record = json.loads((work / "first" / "run.json").read_text())
    assert record["paths"] == "absolute"
    assert record["options"]["cache"] == str(work / "cache")
    assert record["options"]["student"] == str(Path(tiny.student).resolve())
    assert record["options"]["objective"] == "delta"  # what is no path stays as given
    assert run_cli(args).exit_code == 0  # the same run again, paths relative: skipped
    monkeypatch.chdir(elsewhere)
    result = run_cli(["distill", "--config", "../work/first/run.json", "--out", "second"])
    assert result.exit_code == 0, result.output
    assert (elsewhere / "second" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("cache: c\nstudent: s\nout: o\nlearning_rate: 1\n", ["unknown key 'learning_rate'"]),
        ("cache: c\nstudent: s\nout: o\nlr_: 1\n", ["unknown key 'lr_'", "did you mean 'lr'"]),
        ("cache: c\nstudent: s\nout: o\nlr: fast\n", ["'lr' must be a number", '"fast"']),
        ("cache: c\nstudent: s\nout: o\nepochs: 1.5\n", ["'epochs' must be an integer"]),
        ("cache: c\nstudent: s\nout: o\nresume: 3\n", ["'resume' must be"]),
        ("cache: [c\n", ["not valid YAML", "line"]),
        ("- cache\n- student\n", ["must be a mapping"]),
        ("command: eval\ncache: c\n", ["is for 'deltakd eval'"]),
        ("teacher_base: a\ntrain: b\ntest: c\nseed: 4\n", ["looks like a config", "pipeline"]),
        ("student: s\nout: o\n", ["missing option --cache", "'cache:' in --config"]),
        ("cache: c\nstudent: s\nout: o\nlr: -1\n", ["--lr"]),
    ],
)  # fmt: skip
def test_bad_configs_are_one_line(text, fragments, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run_cli(["distill", "--config", path])
    if "missing option" in fragments[0] or fragments[0].startswith("--"):
        assert_one_line_error(result, *fragments)  # the command's own check, as for a flag
    else:
        assert_one_line_error(result, str(path), *fragments)


def test_missing_and_binary_configs(tmp_path):
    assert_one_line_error(
        run_cli(["distill", "--config", tmp_path / "nope.yaml"]), "nope.yaml", "not found"
    )
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x81\xff\x00")
    assert_one_line_error(run_cli(["distill", "--config", binary]), "not a text file")


def test_config_show_of_an_unknown_command():
    result = run_cli(["config", "show", "distil"])
    assert result.exit_code == 2
    assert "unknown command 'distil'" in flat(result.output)


def test_yaml_floats_round_trip():
    """YAML 1.1 reads `2e-05` as a string; what `show` writes must read back as the number."""
    for value in (2e-05, 1e-4, 3.0, 0.1, 1e20):
        assert yaml.safe_load(f"x: {config._yaml_value(value)}")["x"] == value


def test_a_yaml_alias_bomb_is_refused_in_one_line_quickly(tmp_path):
    """Issue 22: nine levels of nine aliases (387 million strings once expanded) hung `config`
    with growing memory while a value was serialised to be shown."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [{', '.join([f'*{previous}'] * 9)}]")
    lines.append("lr: *i")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(DeltakdError, match="more than 100,000 values"):
        config.read_mapping(bomb)
