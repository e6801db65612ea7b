"""`deltakd eval` through the CLI: a run end to end, and bad input as one line with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from deltakd_cli import cli


def _run_main(monkeypatch, capsys, args):
    """Call the real entry point (errors -> one line, exit code) in this process."""
    monkeypatch.setattr(sys, "argv", ["deltakd", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


def test_eval_writes_report_and_rescores_it(tiny, tmp_path):
    out = tmp_path / "reports" / "tiny.json"
    runner = CliRunner()
    args = [
        "eval",
        "--model",
        str(tiny.student),
        "--model",
        str(tiny.teacher_base),
        "--data",
        str(tiny.test),
        "--limit",
        "3",
        "--seeds",
        "5,6",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
        "--template",
        "plain",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--baseline",
        str(tiny.teacher_base),
    ]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "ROUGE-L" in result.output and "difference from" in result.output
    report = json.loads(out.read_text())
    assert report["baseline"] == str(tiny.teacher_base)
    assert report["protocol"]["seeds"] == [5, 6] and report["data"]["rows"] == 3
    generations = out.with_name("tiny.generations.jsonl")
    assert len(generations.read_text().splitlines()) == 2 * 2 * 3

    rescored_path = tmp_path / "rescored.json"
    result = runner.invoke(
        cli.app,
        [
            "eval",
            "--predictions",
            str(generations),
            "--data",
            str(tiny.test),
            "--limit",
            "3",
            "--baseline",
            str(tiny.teacher_base),
            "--out",
            str(rescored_path),
        ],
    )
    assert result.exit_code == 0, result.output
    rescored = json.loads(rescored_path.read_text())
    assert [m["mean"] for m in rescored["models"]] == [m["mean"] for m in report["models"]]
    assert rescored["differences"] == report["differences"]


def test_eval_without_out_prints_only(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli.app,
        [
            "eval",
            "--model",
            str(tiny.student),
            "--data",
            str(tiny.test),
            "--limit",
            "2",
            "--protocol",
            "greedy",
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "ROUGE-L" in result.output and "not saved" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_refs = tmp_path / "norefs.jsonl"
    no_refs.write_text(json.dumps({"instruction": "do it"}) + "\n")
    short_predictions = tmp_path / "short.jsonl"
    short_predictions.write_text(json.dumps({"prediction": "x"}) + "\n")
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    return {"empty": empty, "norefs": no_refs, "short": short_predictions, "broken": broken}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{student}", "--data", "{empty}"], "empty.jsonl: no examples"),
        (["--model", "{student}", "--data", "{norefs}"], "norefs.jsonl:1: the row has no response"),
        (["--model", "{tmp}/missing", "--data", "{test}"], "model not found"),
        (["--model", "{broken}", "--data", "{test}"], "cannot load model"),
        (
            ["--model", "{student}", "--data", "{test}", "--seeds", "10,x"],
            "--seeds: 'x' is not an integer",
        ),
        (
            ["--model", "{student}", "--data", "{test}", "--batch-size", "0"],
            "--batch-size must be at least 1",
        ),
        (
            ["--model", "{student}", "--data", "{test}", "--limit", "-1"],
            "--limit must be at least 1",
        ),
        (
            ["--model", "{student}", "--data", "{test}", "--protocol", "beam"],
            "unknown --protocol 'beam'",
        ),
        (
            ["--model", "{student}", "--data", "{test}", "--baseline", "other"],
            "--baseline other is not one of the models",
        ),
        (["--data", "{test}"], "give at least one --model"),
        (
            ["--model", "{student}", "--predictions", "{short}", "--data", "{test}"],
            "either --model or --predictions",
        ),
        (
            ["--predictions", "{short}", "--data", "{test}"],
            "has 1 predictions but the data has 8 rows",
        ),
        (["--model", "{student}", "--data", "{test}", "--out", "{tmp}"], "is a directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tiny, tmp_path, bad_files, monkeypatch, capsys, args, message
):
    paths = {"student": tiny.student, "test": tiny.test, "tmp": tmp_path, **bad_files}
    code, output = _run_main(monkeypatch, capsys, ["eval", *[a.format(**paths) for a in args]])
    assert code == 2
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], output


@pytest.mark.slow
def test_bad_model_in_a_real_process(tiny, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltakd_cli",
            "eval",
            "--model",
            str(tmp_path / "nope"),
            "--data",
            str(tiny.test),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"error: model not found: {tmp_path / 'nope'}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_eval_names_a_model_and_prints_json_for_scripts(tiny, tmp_path):
    """--model NAME=MODEL shows the model as NAME (a group of one, usable in --compare and
    --baseline); --json prints the report on stdout, parseable, with no table around it."""
    args = ["eval", "--model", f"small={tiny.student}", "--model", tiny.teacher_base,
            "--data", tiny.test, "--limit", 2, "--protocol", "greedy", "--max-new-tokens", 3,
            "--device", "cpu", "--baseline", "small", "--json"]  # fmt: skip
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [group["name"] for group in report["groups"]] == ["small"]
    assert report["baseline"] == str(tiny.student)
    assert report["labels"] == {str(tiny.student): "small"}
    assert [model["name"] for model in report["models"]] == [str(tiny.student),
                                                             str(tiny.teacher_base)]  # fmt: skip
    table = CliRunner().invoke(cli.app, [str(a) for a in args[:-1]])
    assert table.exit_code == 0, table.output
    assert "difference from small" in table.stdout
    rows = [line for line in table.stdout.splitlines() if line.startswith("│ ")]
    assert rows[0].split("│")[1].strip() == "small"
