"""cli.py: the command line answers at once and its help reads. Building the app and showing
any command's help imports nothing heavy (torch, transformers, zarr, datasets, numpy): those
load when a command runs. Help at 80 columns keeps every flag whole and every extra visible."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from helpers import REPO, assert_one_line_error, flat, run_cli
from typer.testing import CliRunner

from deltakd_cli.cli import app
from deltakd_cli.commands import BY_NAME, COMMANDS
from deltakd_cli.options import choices_of, flag_of, option_fields

HEAVY = ("torch", "transformers", "zarr", "datasets", "numpy")

PROBE = """
import json, sys
from typer.testing import CliRunner
from deltakd_cli.cli import app
runner = CliRunner()
for args in json.loads(sys.argv[1]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


@pytest.mark.slow
def test_help_version_and_config_show_import_nothing_heavy():
    """In a fresh interpreter (this one has torch already): the app, `--help` of the app and of
    every command, `--version` and `config show` leave torch and the rest unimported."""
    calls = [["--help"], ["--version"], ["config", "show", "distill"]]
    calls += [[command.name, "--help"] for command in COMMANDS]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(calls)],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert "deltakd_cli" in loaded and "typer" in loaded  # the probe did import the CLI
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def whole_flag(flag: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_help_reads_at_80_columns(command, monkeypatch):
    """Every command's help at 80 columns, through -h: each flag whole, its choices listed, no
    line past 80 columns, no extra eaten as markup (`deltakd[lora]`), no emoji made of text."""
    monkeypatch.setenv("COLUMNS", "80")
    result = run_cli([command, "-h"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert max(len(line) for line in text.splitlines()) <= 80
    assert not any(ord(char) >= 0x1F000 for char in text)  # no :name: turned into an emoji
    flat_text = flat(text)
    assert "'deltakd'" not in flat_text  # an extra eaten as markup
    for field in option_fields(BY_NAME[command].options):
        if field.metadata.get("argument"):
            continue
        assert whole_flag(flag_of(field), text), (command, flag_of(field))
        for choice in choices_of(field) or ():
            assert whole_flag(str(choice), flat_text), (command, field.name, choice)
        for extra in re.findall(r"deltakd\[\w+\]", field.metadata["help"]):
            assert extra in flat_text, (command, extra)


@pytest.mark.slow
def test_logs_through_a_pipe_are_never_wrapped(tmp_path):
    """Output that is not a terminal (nohup, SLURM, tee): a status line and an echoed stage
    command of 300 characters each stay one line, and the command runs as printed."""
    probe = (
        "from deltakd_cli.console import info\n"
        "from deltakd_cli.pipeline.stages import Stage\n"
        "from deltakd_cli.train.options import DistillOptions\n"
        "long = '/data/' + 'x' * 200\n"
        "info('the host has available ' + '19.3 GiB ' * 30)\n"
        "stage = Stage('s', 'distill', DistillOptions(cache=long, student=long, out='o'),"
        " None, 'run.json')\n"
        "info('$ ' + stage.shown)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].count("19.3 GiB") == 30
    echoed = shlex.split(lines[1].removeprefix("$ "))
    assert echoed[:2] == ["deltakd", "distill"] and echoed.count("/data/" + "x" * 200) == 2


def test_old_flag_names_still_work_hidden_with_a_note(monkeypatch, tmp_path):
    """One name per concept: init-student's --source is --student-from (as in pipeline), the
    pipeline's eval --seeds is --eval-seeds. The old spellings give the same options with a
    note, are not in --help, and clash with the new one in one line."""
    seen = []
    monkeypatch.setattr("deltakd_cli.cli.run_command", lambda name, options: seen.append(options))
    new = run_cli(["init-student", "--student-from", "m", "--out", tmp_path / "s"])
    old = run_cli(["init-student", "--source", "m", "--out", tmp_path / "s"])
    assert new.exit_code == old.exit_code == 0, old.output
    assert seen[0] == seen[1] and seen[0].source == "m"
    assert "--source is now --student-from" in flat(old.output)
    assert not whole_flag("--source", run_cli(["init-student", "-h"]).output)
    both = run_cli(["init-student", "--student-from", "m", "--source", "n", "--out", "o"])
    assert_one_line_error(both, "--student-from is given twice")
    base = ["pipeline", "--teacher-base", "t", "--student", "s", "--train", "a", "--test", "b"]
    assert run_cli([*base, "--seeds", "1,2"]).exit_code == 0
    assert run_cli([*base, "--eval-seeds", "1,2"]).exit_code == 0
    assert seen[-1] == seen[-2] and seen[-1].seeds == "1,2"


def test_pipeline_max_steps_reaches_every_student(monkeypatch, tmp_path):
    from conftest import make_rows, write_jsonl

    from deltakd_cli.pipeline.plan import plan_stages

    seen = []
    monkeypatch.setattr("deltakd_cli.cli.run_command", lambda name, options: seen.append(options))
    rows = str(write_jsonl(tmp_path / "rows.jsonl", make_rows(4)))
    args = ["pipeline", "--teacher-base", "t", "--teacher-tuned", "u", "--student", "s",
            "--train", rows, "--test", rows, "--out", tmp_path / "o", "--max-steps", 7]  # fmt: skip
    assert run_cli(args).exit_code == 0
    students = [s.options for s in plan_stages(seen[-1])[0] if s.command == "distill"]
    assert len(students) == 3 and all(s.max_steps == 7 for s in students)


def test_shell_completion_is_installable():
    """`deltakd --show-completion SHELL` prints the script `--install-completion` installs, and
    the completion itself answers with the commands."""
    # typer reads the shell from the parent processes unless told not to (under make the parent
    # may be sh, which it does not support): name it, as a user does on a new machine
    shown = subprocess.run(
        [sys.executable, "-m", "deltakd_cli", "--show-completion", "bash"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "complete" in shown.stdout and "COMP_WORDS" in shown.stdout
    env = {"_DELTAKD_COMPLETE": "complete_bash", "COMP_WORDS": "deltakd ca", "COMP_CWORD": "1"}
    completed = CliRunner().invoke(app, [], env={**os.environ, **env}, prog_name="deltakd")
    assert "cache-teachers" in completed.output


@pytest.mark.slow
def test_help_and_version_build_no_command():
    """Issue 27: `deltakd --help` took 3.4-3.8x `import typer, rich` because every command was
    built (every options module imported) before anything was printed. Now the root help lists
    each command by its summary and builds none; a command's own help builds that one only."""
    probe = """
import json, sys
from typer.testing import CliRunner
from deltakd_cli.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
assert result.exit_code == 0, result.output
print(json.dumps({"output": result.output, "modules": sorted(sys.modules)}))
"""
    options_modules = {command.options_at.split(":")[0] for command in COMMANDS}

    def run(*args: str) -> dict:
        done = subprocess.run([sys.executable, "-c", probe, *args], cwd=REPO,
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    for args in (["--help"], ["--version"]):
        seen = run(*args)
        assert options_modules.isdisjoint(seen["modules"]), args
    listing = flat(run("--help")["output"])
    for command in COMMANDS:
        assert flat(f"{command.name} {command.summary}") in listing
    one = run("inspect", "--help")
    assert "deltakd_cli.cache.options" in one["modules"]
    assert "deltakd_cli.train.options" not in one["modules"]
