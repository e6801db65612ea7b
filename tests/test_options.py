"""options.py and the CLI built from it: each command's flags, help, defaults, checks, record and
stage command line all come from one dataclass, and they agree with each other."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import assert_one_line_error, run_cli

from deltakd_cli import commands
from deltakd_cli.cache.options import CacheOptions
from deltakd_cli.commands import COMMANDS
from deltakd_cli.errors import DeltakdError
from deltakd_cli.options import check, flag_of, option_fields, record, to_argv, typer_parameters
from deltakd_cli.report.options import ReportOptions
from deltakd_cli.train.options import DistillOptions, FinetuneOptions


def test_every_field_is_a_flag_with_help():
    for command in COMMANDS:
        parameters = typer_parameters(command.options)
        names = [p.name for p in parameters]
        assert names == [f.name for f in option_fields(command.options)]
        for field in option_fields(command.options):
            assert field.metadata["help"], f"{command.name} {field.name} has no help"
        required = [f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                    for f in option_fields(command.options)]  # fmt: skip
        assert required == sorted(required, reverse=True)  # required options first


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_help_lists_every_flag(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # long flags are not folded
    result = run_cli([command, "--help"])
    assert result.exit_code == 0, result.output
    for field in option_fields(commands.BY_NAME[command].options):
        if not field.metadata.get("argument"):
            assert flag_of(field) in result.output, flag_of(field)


def test_checks_name_the_flag():
    base = {"cache": "c", "student": "s", "out": "o"}
    cases = [
        ({"lr": 0.0}, "--lr must be > 0, got 0.0"),
        ({"sft_weight": 2.0}, "--sft-weight must be between 0 and 1, got 2.0"),
        ({"beta1": 1.0}, r"--beta1 must be in \[0, 1\), got 1.0"),
        ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
        ({"objective": "nope"}, "unknown --objective 'nope' \\(choose from sft, kd, delta"),
        ({"alpha": float("nan")}, "--alpha must be a finite number"),
        ({"max_steps": -1}, "--max-steps must be >= 0"),
        # issue 22: 1e38 is finite, and overflowed float32 in AdamW at the first step
        ({"lr": 1e38}, "--lr must be at most 3.4e\\+35 \\(larger overflows float32"),
    ]
    for change, message in cases:
        with pytest.raises(DeltakdError, match=message):
            check(DistillOptions(**base, **change))
    check(DistillOptions(**base))


def test_the_command_line_of_a_stage_gives_back_its_options(monkeypatch):
    """to_argv (what a pipeline stage passes, also under torchrun) parsed by the real CLI gives
    the very same options object; unset options stay off the command line."""
    seen = []
    monkeypatch.setattr(commands, "run_command", lambda name, options: seen.append(options))
    monkeypatch.setattr("deltakd_cli.cli.run_command", lambda name, options: seen.append(options))
    stages = [
        DistillOptions(cache="c", student="s", out="o", objective="kd", lr=1e-3, resume=True,
                       frozen_student=True, verify_cache=False, max_tokens_per_batch=512),
        FinetuneOptions(model="m", data="d.jsonl", out="o", template="chat", max_length=64),
        CacheOptions(teacher_base="b", teacher_tuned="t", data="d", out="o", student="s",
                     gammas=(0.0, 0.1234567, 1 / 3), alphas=(1.5,)),
    ]  # fmt: skip
    names = {DistillOptions: "distill", FinetuneOptions: "finetune", CacheOptions: "cache-teachers"}
    for options in stages:
        argv = to_argv(options)
        name = names[type(options)]
        result = run_cli([name, *argv])
        assert result.exit_code == 0, result.output
        assert seen[-1] == options
        assert record(seen[-1]) == record(options)
    assert to_argv(DistillOptions(cache="c", student="s", out="o")) == [
        "--cache", "c", "--student", "s", "--out", "o", "--batch-size", "8",
    ]  # fmt: skip


def test_number_lists_are_read_once_into_floats(monkeypatch, tmp_path):
    """--gammas text becomes a tuple of floats as the options are built (from the flag or from
    a config's list), and a bad list is one line naming the flag."""
    seen = []
    monkeypatch.setattr("deltakd_cli.cli.run_command", lambda name, options: seen.append(options))
    base = ["cache-teachers", "--teacher-base", "b", "--teacher-tuned", "t", "--data", "d",
            "--out", "o"]  # fmt: skip
    assert run_cli([*base, "--gammas", "0, 0.1234567,1"]).exit_code == 0
    assert seen[-1].gammas == (0.0, 0.1234567, 1.0) and seen[-1].alphas is None
    config = tmp_path / "c.yaml"
    config.write_text("gammas: [0, 0.1234567]\nalphas: 2,3\n")
    assert run_cli([*base, "--config", config]).exit_code == 0
    assert (seen[-1].gammas, seen[-1].alphas) == ((0.0, 0.1234567), (2.0, 3.0))
    assert_one_line_error(run_cli([*base, "--gammas", "0,x"]), "--gammas: 'x' is not a number")
    assert_one_line_error(run_cli([*base, "--alphas", "1,1"]), "--alphas: 1 is given twice")


def test_a_list_argument_takes_one_or_more_values(monkeypatch):
    """A positional `list[str]` field (`report DIR...`): every value given, in order, and back
    through to_argv; none given is typer's usage error."""
    seen = []
    monkeypatch.setattr("deltakd_cli.cli.run_command", lambda name, options: seen.append(options))
    for dirs in (["a"], ["runs/a", "runs/b c", "report.json"]):
        options = ReportOptions(dirs=dirs, out="r")
        argv = to_argv(options)
        assert argv == [*dirs, "--out", "r"]
        result = run_cli(["report", *argv])
        assert result.exit_code == 0, result.output
        assert seen[-1] == options and isinstance(seen[-1].dirs, list)
    result = run_cli(["report", "--out", "r"])
    assert_one_line_error(result, "missing argument DIR...")


def test_a_bad_choice_on_the_command_line_is_one_line(tiny, tmp_path):
    result = run_cli(["distill", "--cache", tmp_path / "c", "--student", tiny.student, "--out",
                      tmp_path / "o", "--objective", "nope"])  # fmt: skip
    assert_one_line_error(result, "unknown --objective 'nope'")
