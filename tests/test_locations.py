"""Outputs and inputs given as URLs (issue 26): every command that writes either writes through
fsspec (cache-teachers) or refuses a URL in one line naming the command and the scheme, and never
makes a local folder called `s3:` or `file:`; `file://` is the local path it names, for outputs
and inputs alike (docs/reliability.md, promise 10)."""

from __future__ import annotations

import json

import pytest

from deltakd_cli.errors import DeltakdError
from deltakd_cli.options import check
from deltakd_cli.report.options import ReportOptions
from deltakd_cli.train.options import DistillOptions, PushOptions
from tests.helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _commands(tiny, url: str) -> dict[str, list[str]]:
    """Each writing command with its output (and report's input) at `url`."""
    model, data = str(tiny.student), str(tiny.train)
    return {
        "distill": ["distill", "--cache", "c", "--student", model, "--out", url],
        "finetune": ["finetune", "--model", model, "--data", data, "--out", url],
        "eval": ["eval", "--model", model, "--data", data, "--out", url + "/r.json"],
        "report": ["report", str(tiny.root), "--out", url],
        "pipeline": [
            "pipeline",
            "--teacher-base",
            model,
            "--train",
            data,
            "--student",
            model,
            "--out",
            url,
        ],  # fmt: skip
        "init-student": ["init-student", "--student-from", model, "--out", url],
        "demo": ["demo", "--work-dir", url, "--estimate"],
    }


@pytest.mark.parametrize("scheme", ["s3", "gs"])
@pytest.mark.parametrize(
    "command", ["distill", "finetune", "eval", "report", "pipeline", "init-student", "demo"]
)
def test_a_url_output_is_refused_naming_the_command_and_the_scheme(
    tiny, tmp_path, monkeypatch, command, scheme
):
    monkeypatch.chdir(tmp_path)
    result = run_cli(_commands(tiny, f"{scheme}://bkt/x")[command])
    assert_one_line_error(
        result, f"{command} ", f"{scheme}://bkt/x", f"{command} writes a local",
        f"{scheme}:// outputs are not supported (write locally, then copy)",
    )  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # no ./s3: folder, nothing at all


def test_a_url_input_of_report_is_refused_and_the_check_is_one_rule():
    """One rule in options.check, for inputs too: report reads local folders."""
    options = ReportOptions(dirs=["runs/a", "s3://bkt/run"], out="r")
    with pytest.raises(DeltakdError, match=r"report DIR s3://bkt/run: report reads local folders"):
        check(options)
    with pytest.raises(DeltakdError, match=r"push DIR gs://bkt/m: push reads local folders"):
        check(PushOptions(dir="gs://bkt/m", repo="me/m"))
    options = DistillOptions(cache="s3://bkt/cache", student="s", out="file:///tmp/run")
    check(options)  # a cache may live on an object store; file:// is the local path
    assert options.out == "/tmp/run" and options.cache == "s3://bkt/cache"


def test_file_urls_are_local_paths_for_outputs_and_inputs(tiny, tmp_path, monkeypatch):
    """finetune --out file:///abs writes /abs (never ./file:), and prints that path; eval --out
    and report, with a file:// input and output, do the same."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    result = run_cli(
        ["finetune", "--model", tiny.student, "--data", tiny.train, "--out", f"file://{run}",
         "--max-steps", "1", "--batch-size", "4", "--max-length", "64", "--device", "cpu",
         "--template", "plain"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (run / "run.json").is_file() and (run / "config.json").is_file()
    assert f"model: {run}" in " ".join(result.output.split())
    assert not (tmp_path / "file:").exists()

    report_json = tmp_path / "eval" / "r.json"
    result = run_cli(
        ["eval", "--model", f"file://{run}", "--data", tiny.test, "--out", f"file://{report_json}",
         "--protocol", "greedy", "--max-new-tokens", "4", "--limit", "2", "--device", "cpu",
         "--template", "plain"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(report_json.read_text())["generations_file"] == "r.generations.jsonl"

    pytest.importorskip("matplotlib")
    pages = tmp_path / "pages"
    result = run_cli(["report", f"file://{run}", f"file://{report_json}", "--out",
                      f"file://{pages}"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (pages / "index.html").is_file()
    assert not (tmp_path / "file:").exists()
