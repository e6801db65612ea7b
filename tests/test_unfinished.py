"""Runs and evals that cannot be mistaken for finished ones (issue 26, docs/reliability.md
promise 1): an interrupted `eval --out` reruns as its message promises, and every reader of a
model folder refuses a training run (or base student) that did not finish, naming the folder and
how to finish it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltakd_cli import faults, outputs
from deltakd_cli.errors import DeltakdError, Interrupted
from deltakd_cli.evaluate.report import claim_path
from tests.helpers import REPO, assert_one_line_error, flat, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- eval --out


def _predictions(tiny, tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in tiny.test.read_text().splitlines()]
    path = tmp_path / "predictions.jsonl"
    lines = [json.dumps({"prediction": row["response"][:20]}) + "\n" for row in rows]
    path.write_text("".join(lines))
    return path


def _eval_args(tiny, predictions: Path, report: Path, *extra) -> list:
    return ["eval", "--predictions", predictions, "--data", tiny.test, "--out", report, *extra]


def _run_with_fault(args: list, fault: str, monkeypatch):
    monkeypatch.setenv(faults.FAULT_ENV, fault)
    faults.reset()
    try:
        return run_cli(args)
    finally:
        monkeypatch.delenv(faults.FAULT_ENV)


def _point_of(args: list, name: str, tmp_path: Path, monkeypatch) -> int:
    """The 1-based index of fault point `name` in a traced run of `args` (whose outputs are
    then removed)."""
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv(faults.TRACE_ENV, str(trace))
    faults.reset()
    result = run_cli(args)
    monkeypatch.delenv(faults.TRACE_ENV)
    assert result.exit_code == 0, result.output
    points = trace.read_text().splitlines()
    trace.unlink()
    return points.index(name) + 1


def test_an_eval_stopped_between_its_two_files_reruns(tiny, tmp_path, monkeypatch):
    """A full disk between REPORT.generations.jsonl and REPORT.json: the rerun (with or without
    --overwrite) starts over and writes both; it used to say the generations file "is not an
    eval output deltakd wrote"."""
    predictions = _predictions(tiny, tmp_path)
    report = tmp_path / "out" / "r.json"
    args = _eval_args(tiny, predictions, report)
    index = _point_of(args, "write r.json", tmp_path, monkeypatch)
    expected = json.loads(report.read_text())
    for extra in ([], ["--overwrite"]):
        for path in (report, report.with_name("r.generations.jsonl")):
            path.unlink()
        stopped = _run_with_fault([*args, *extra], f"enospc@{index}", monkeypatch)
        assert_one_line_error(stopped, "no space left on the device")
        assert not report.exists() and report.with_name("r.generations.jsonl").exists()
        claimed = claim_path(report).exists()  # the generations file is marked as the eval's
        rerun = run_cli([*args, *extra])
        assert rerun.exit_code == 0, rerun.output  # it said "is not an eval output deltakd wrote"
        assert claimed
        assert json.loads(report.read_text())["models"] == expected["models"]
        assert not claim_path(report).exists()  # the whole report proves its own files now
    again = run_cli(args)  # a finished report is still kept without --overwrite
    assert_one_line_error(again, "already exists (an eval report of an earlier run)")


def test_a_user_file_named_like_the_claim_is_never_taken(tiny, tmp_path):
    predictions = _predictions(tiny, tmp_path)
    report = tmp_path / "r.json"
    claim_path(report).write_text("my notes\n")
    (tmp_path / "r.generations.jsonl").write_text("mine\n")
    for extra in ([], ["--overwrite"]):
        result = run_cli(_eval_args(tiny, predictions, report, *extra))
        assert_one_line_error(result, "is not an eval output deltakd wrote")
    assert claim_path(report).read_text() == "my notes\n"
    assert (tmp_path / "r.generations.jsonl").read_text() == "mine\n"


def _stop_at(args: list, point: int, trace: Path, how: signal.Signals):
    """Start `args`, wait until it pauses at fault point `point`, send `how`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           faults.FAULT_ENV: f"pause@{point}", faults.TRACE_ENV: str(trace)}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "deltakd_cli", *map(str, args)], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if trace.exists() and len(trace.read_text().splitlines()) >= point:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=120)
    trace.unlink()
    return process.returncode, stderr


@pytest.mark.slow
def test_an_eval_stopped_by_ctrl_c_or_sigterm_between_its_files_reruns(tiny, tmp_path, monkeypatch):
    predictions = _predictions(tiny, tmp_path)
    report = tmp_path / "r.json"
    args = _eval_args(tiny, predictions, report)
    index = _point_of(args, "write r.json", tmp_path, monkeypatch)
    for how in (signal.SIGINT, signal.SIGTERM):
        for path in (report, report.with_name("r.generations.jsonl")):
            path.unlink()
        code, stderr = _stop_at(args, index, tmp_path / "trace.txt", how)
        assert code == (130 if how == signal.SIGINT else -signal.SIGTERM), stderr
        assert "Traceback" not in stderr
        if how == signal.SIGINT:
            assert "rerun the same command" in flat(stderr)
        assert not report.exists() and report.with_name("r.generations.jsonl").exists()
        rerun = run_cli(args)
        assert rerun.exit_code == 0, rerun.output
        assert report.exists() and not claim_path(report).exists()


# ----------------------------------------------------------------------------- model folders


FINETUNE = ["--batch-size", 4, "--max-length", 64, "--device", "cpu", "--template", "plain",
            "--save-every", 1]  # fmt: skip


@pytest.fixture(scope="module")
def stopped_in_export(tiny, tmp_path_factory):
    """A finished finetune run (1 step), resumed to 2 steps and stopped by a full disk as its
    export had moved some files in: the previous step's config.json and weights are at the top
    level, run.json is gone. And a copy in the state a Ctrl-C mid-export leaves
    (`.export.partial`)."""
    root = tmp_path_factory.mktemp("unfinished")
    run = root / "run"

    def finetune(out: Path, steps: int) -> list:
        return ["finetune", "--model", tiny.student, "--data", tiny.train, "--out", out,
                "--max-steps", steps, *FINETUNE]  # fmt: skip

    args = finetune(run, 2)
    first = run_cli(finetune(run, 1))
    assert first.exit_code == 0, first.output
    probe = root / "probe"  # the same resume, traced: where its export moves config.json in
    shutil.copytree(run, probe)
    trace = root / "trace.txt"
    os.environ[faults.TRACE_ENV] = str(trace)
    try:
        faults.reset()
        assert run_cli([*finetune(probe, 2), "--resume"]).exit_code == 0
    finally:
        del os.environ[faults.TRACE_ENV]
    points = trace.read_text().splitlines()
    os.environ[faults.FAULT_ENV] = f"enospc@{points.index('export config.json') + 1}"
    try:
        faults.reset()
        stopped = run_cli([*args, "--resume"])
    finally:
        del os.environ[faults.FAULT_ENV]
    assert stopped.exit_code == 2, stopped.output
    assert (run / "config.json").exists() and not (run / "run.json").exists()
    mid_export = root / "mid-export"
    mid_export.mkdir()
    for entry in probe.iterdir():
        if entry.is_file():
            (mid_export / entry.name).write_bytes(entry.read_bytes())
    (mid_export / "run.json").unlink()
    (mid_export / ".export.partial").mkdir()
    return {"resumed": run, "mid-export": mid_export, "args": args}


@pytest.mark.parametrize("state", ["resumed", "mid-export"])
def test_every_reader_refuses_an_unfinished_training_folder(
    tiny, stopped_in_export, tmp_path, state
):
    folder = stopped_in_export[state]
    readers = {
        "eval": ["eval", "--model", folder, "--data", tiny.test, "--limit", 1, "--device", "cpu"],
        "init-student": ["init-student", "--student-from", folder, "--out", tmp_path / "s"],
        "push": ["push", folder, "someone/model"],
        "distill": [
            "distill",
            "--cache",
            tmp_path / "c",
            "--student",
            folder,
            "--out",
            tmp_path / "d",
        ],  # fmt: skip
    }
    for command, args in readers.items():
        result = run_cli(args)
        assert_one_line_error(result, str(folder), "--resume")
        assert "did not finish" in flat(result.output), command
    assert not (tmp_path / "s").exists() and not (tmp_path / "d").exists()


def test_resume_finishes_it_and_then_it_reads(tiny, stopped_in_export):
    """The refusal's advice works: --resume finishes the run, and eval takes it."""
    run = stopped_in_export["resumed"]
    resumed = run_cli([*stopped_in_export["args"], "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert outputs.unfinished_model(run) is None
    scored = run_cli(["eval", "--model", run, "--data", tiny.test, "--limit", 1, "--device",
                      "cpu", "--protocol", "greedy", "--max-new-tokens", 2])  # fmt: skip
    assert scored.exit_code == 0, scored.output


def test_a_training_folder_without_run_json_is_not_scored_in_silence(tiny, tmp_path):
    """A run's folder (its marker) that holds a model but no run.json: refused, not scored."""
    folder = tmp_path / "run"
    folder.mkdir()
    for entry in Path(tiny.student).iterdir():
        (folder / entry.name).write_bytes(entry.read_bytes())
    outputs.write_marker(folder, "training-run", [p.name for p in folder.iterdir()])
    result = run_cli(["eval", "--model", folder, "--data", tiny.test, "--device", "cpu"])
    assert_one_line_error(result, f"{folder}: a training run that did not finish (no run.json)")


def test_an_unfinished_base_student_is_refused(tiny, tmp_path):
    folder = tmp_path / "student"
    folder.mkdir()
    for entry in Path(tiny.student).iterdir():
        (folder / entry.name).write_bytes(entry.read_bytes())
    outputs.write_marker(folder, "student", [p.name for p in folder.iterdir()])
    result = run_cli(["eval", "--model", folder, "--data", tiny.test, "--device", "cpu"])
    assert_one_line_error(result, "no init-student.json", "rerun its init-student command")


# ----------------------------------------------------------------------------- minor


def test_eval_out_inside_a_model_names_the_model_once(tiny, tmp_path):
    model = tmp_path / "S"
    model.mkdir()
    for entry in Path(tiny.student).iterdir():
        (model / entry.name).write_bytes(entry.read_bytes())
    result = run_cli(
        ["eval", "--model", model, "--data", tiny.test, "--out", model / "config.json"]
    )
    assert_one_line_error(result, f"config.json is inside --model {model}: writing there")
    assert f"{model} {model}" not in flat(result.output)  # it said "inside --model S S"


def test_a_required_option_given_as_none_is_named_as_missing(tiny, tmp_path):
    """The API's `cache=None` said "cache not found: None"."""
    import deltakd

    with pytest.raises(DeltakdError) as raised:
        deltakd.distill(cache=None, student=str(tiny.student), out=str(tmp_path / "run"))
    assert str(raised.value) == "cache is required; it is None"
    config = tmp_path / "distill.yaml"  # a config file still shows with required options unset
    config.write_text("lr: 0.001\n")
    shown = run_cli(["config", "show", "distill", "--config", config])
    assert shown.exit_code == 0 and "lr: 0.001" in shown.output, shown.output


def test_ctrl_c_in_init_student_names_init_student(tiny, tmp_path):
    """Ctrl-C while init-student runs its healing cache: the line names init-student and how
    to continue, not the inner cache-teachers."""
    from deltakd_cli.init_student.options import InitStudentOptions
    from deltakd_cli.init_student.run import init_student

    def stopped(command, options):
        raise Interrupted(f"{command} stopped; rerun the same command to resume")

    options = InitStudentOptions(
        source=str(tiny.student), out=str(tmp_path / "s"), heal_data=str(tiny.train),
        layers=1, device="cpu", layer_rule="uniform",
    )  # fmt: skip
    with pytest.raises(Interrupted) as raised:
        init_student(options, stopped)
    assert str(raised.value).startswith("init-student stopped; rerun the same command")
