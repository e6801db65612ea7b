"""`--report-to tensorboard,wandb,mlflow`: each tracker's own files, read back with its own
reader, hold one point per logged step of every metric, equal to metrics.jsonl; and progress
through a pipe is plain lines."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from helpers import (
    assert_one_line_error,
    run_cli,
    run_module,
    train_and_held_out_caches,
)

from deltakd_cli import tracking

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def caches(tiny, tmp_path_factory):
    """A training cache of the train rows and a held-out cache of the test rows."""
    return train_and_held_out_caches(tiny, tmp_path_factory.mktemp("tracking"))


@pytest.fixture(scope="module")
def tracked_run(tiny, caches, tmp_path_factory):
    """One distill run logged to all three trackers (W&B offline, MLflow in a local store)."""
    train, held_out = caches
    out = tmp_path_factory.mktemp("tracked") / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    saved = {key: os.environ.get(key) for key in [*env, "MLFLOW_TRACKING_URI"]}
    os.environ.update(env)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        result = run_cli(
            [
                "distill", "--cache", train, "--student", tiny.student, "--out", out,
                "--lr", "5e-3", "--batch-size", 3, "--max-steps", 5, "--log-every", 2,
                "--eval-data", held_out, "--eval-every", 3,
                "--report-to", "tensorboard,wandb,mlflow", "--num-workers", 0, "--device", "cpu",
            ]
        )  # fmt: skip
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, lines


def expected_points(lines: list[dict], key: str) -> list[tuple[int, float]]:
    return [(line["step"], float(line[key])) for line in lines if key in line]


@pytest.mark.slow
def test_metrics_lines_are_the_logged_steps(tracked_run):
    out, lines = tracked_run
    assert [line["step"] for line in lines] == [2, 3, 4, 5]  # log-every 2, held-out at 3, end
    assert [line["step"] for line in lines if "eval_loss" in line] == [3, 5]
    final = json.loads((out / "run.json").read_text())["final_metrics"]
    assert lines[-1]["target_tokens_seen"] == final["target_tokens"]  # every step's, not logged
    seen = [line["target_tokens_seen"] for line in lines]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


@pytest.mark.slow
def test_tensorboard_events_read_back(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, lines = tracked_run
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    for key, name in [*tracking.TRAIN_KEYS.items(), ("eval_loss", "eval/loss")]:
        points = [(e.step, e.value) for e in events.Scalars(name)]
        expected = expected_points(lines, key)
        assert [step for step, _ in points] == [step for step, _ in expected], name
        assert [v for _, v in points] == pytest.approx([v for _, v in expected], rel=1e-6), name
    (params,) = events.Tensors("params/text_summary")
    table = params.tensor_proto.string_val[0].decode()
    assert "| objective | delta |" in table and "| lr | 0.005 |" in table


def _wandb_records(path: Path):
    """The records of a .wandb transaction log: W&B's 7-byte header, then the LevelDB log
    format (32 KiB blocks of chunks, each with a 7-byte header: crc, length, type)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:  # FULL
            yield chunk
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            yield pending + chunk


def _wandb_history(run_dir: Path) -> list[dict]:
    """Every history row of an offline W&B run, decoded with W&B's own record schema."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    rows = []
    for data in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item  # a key with "/" is stored split, as nested_key
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in items})  # fmt: skip
    return rows


@pytest.mark.slow
def test_wandb_offline_run_reads_back(tracked_run):
    out, lines = tracked_run
    run = json.loads((out / "run.json").read_text())
    where = run["resolved"]["trackers"]["wandb"]
    assert where["mode"] == "offline"
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    history = _wandb_history(run_dir)
    for key, name in [("loss", "train/loss"), ("lr", "train/lr"), ("eval_loss", "eval/loss")]:
        points = [(row["_step"], row[name]) for row in history if name in row]
        expected = expected_points(lines, key)
        assert [s for s, _ in points] == [s for s, _ in expected], name
        assert [v for _, v in points] == pytest.approx([v for _, v in expected], rel=1e-6)
    config = _wandb_config(run_dir)
    assert config["objective"] == "delta" and config["lr"] == 5e-3


def _wandb_config(run_dir: Path) -> dict:
    """The run's config (the options as parameters), from its config records."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    config = {}
    for data in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config


@pytest.mark.slow
def test_mlflow_file_store_reads_back(tracked_run):
    from mlflow.tracking import MlflowClient

    out, lines = tracked_run
    where = json.loads((out / "run.json").read_text())["resolved"]["trackers"]["mlflow"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run = client.get_run(where["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["objective"] == "delta"
    for key, name in [
        ("loss", "train/loss"),
        ("grad_norm", "train/grad_norm"),
        ("eval_sft", "eval/sft"),
    ]:
        history = sorted(client.get_metric_history(where["run_id"], name), key=lambda m: m.step)
        expected = expected_points(lines, key)
        assert [m.step for m in history] == [s for s, _ in expected], name
        assert [m.value for m in history] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_unknown_tracker_is_one_line(tiny, caches, tmp_path):
    train, _ = caches
    result = run_cli(
        ["distill", "--cache", train, "--student", tiny.student, "--out", tmp_path / "o",
         "--report-to", "tensorboard,comet"]
    )  # fmt: skip
    assert_one_line_error(result, "unknown --report-to 'comet'", "tensorboard, wandb, mlflow")


def test_a_missing_tracker_library_names_the_extra(monkeypatch):
    monkeypatch.setattr(tracking, "_installed", lambda module: module != "wandb")
    with pytest.raises(tracking.DeltakdError, match=r"deltakd\[tracking\]"):
        tracking.parse_report_to("tensorboard,wandb")


def test_flatten_params_keeps_numbers_and_cuts_long_strings():
    flat = tracking.flatten_params(
        {"lr": 1e-3, "fsdp": False, "nested": {"a": 1, "b": [1, 2]}, "long": "x" * 900}
    )
    assert flat["lr"] == 1e-3 and flat["fsdp"] == "False"
    assert flat["nested.a"] == 1 and flat["nested.b"] == "[1, 2]"
    assert len(flat["long"]) == tracking.MAX_VALUE_CHARS


# ----------------------------------------------------------------------------- batch output

PLAIN_LINE = re.compile(
    r"^distill step (\d+)/5 \(\d+%\) loss [\d.]+ sft [\d.]+ distill [\d.]+ lr \S+ [\d,]+ tok/s"
    r".* elapsed \d+:\d\d:\d\d eta (\d+:\d\d:\d\d|-:--:--)$"
)


@pytest.mark.slow
def test_progress_through_a_pipe_is_plain_lines(tiny, caches, tmp_path):
    """stderr to a pipe (as under nohup, SLURM or `| tee`): whole lines, never a bar redrawn with
    carriage returns; with DELTAKD_LOG_SECONDS=0 one per step, each with step, loss and ETA."""
    train, _ = caches
    result = run_module(
        [
            "distill", "--cache", str(train), "--student", str(tiny.student),
            "--out", str(tmp_path / "piped"), "--lr", "5e-3", "--batch-size", "3",
            "--max-steps", "5", "--num-workers", "0", "--device", "cpu",
        ],
        env_extra={"DELTAKD_LOG_SECONDS": "0", "OMP_NUM_THREADS": "1", "COLUMNS": "80"},
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr
    steps = [int(m.group(1)) for m in map(PLAIN_LINE.match, result.stderr.splitlines()) if m]
    assert steps == [1, 2, 3, 4, 5], result.stderr
    assert result.stderr.splitlines()[-3].endswith("eta 0:00:00") or "eta 0:00:00" in result.stderr


def test_the_terminal_bar_keeps_count_and_eta_at_80_columns():
    """At 80 columns the rich bar drops the free text first: the step count and ETA stay."""
    import io

    from rich.console import Console

    from deltakd_cli import console as console_module

    terminal = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    saved = console_module.console
    console_module.console = terminal
    try:
        bar = console_module.progress()
        with bar:
            task = bar.add_task("distill", total=300, completed=12, status="loss 1.2345 " * 10)
            bar.refresh()
            text = terminal.file.getvalue()
    finally:
        console_module.console = saved
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)  # cursor controls, not columns
    last = [line for line in text.replace("\r", "\n").splitlines() if "distill" in line][-1]
    assert len(last) <= 80
    assert "12/300" in last and "eta" in last and task == 0
