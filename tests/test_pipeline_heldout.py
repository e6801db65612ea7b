"""The pipeline's held-out split, its eval ROUGE-L in the trackers, and the model card (the
end-to-end run is in test_pipeline.py)."""

from __future__ import annotations

import json

import pytest
from helpers import assert_one_line_error, run_cli

from deltakd_cli.errors import DeltakdError
from deltakd_cli.pipeline import heldout
from deltakd_cli.pipeline.options import PipelineOptions
from deltakd_cli.pipeline.run import log_results
from deltakd_cli.train.card import model_card


def test_split_rows_is_a_seeded_share_capped_and_never_everything():
    held = heldout.split_rows(200, 0.05, seed=0)
    assert len(held) == 10 and held == sorted(held) and len(set(held)) == 10
    assert heldout.split_rows(200, 0.05, seed=0) == held
    assert heldout.split_rows(200, 0.05, seed=1) != held
    assert len(heldout.split_rows(100_000, 0.2, seed=0)) == heldout.MAX_VALIDATION_ROWS
    assert heldout.split_rows(9, 0.05, seed=0) == []  # round(0.45) = 0: nothing held out
    assert heldout.split_rows(1, 0.49, seed=0) == []  # never the only training row


def test_the_test_split_is_disjoint_seeded_and_never_moved_by_validation():
    split = heldout.cut_split(100, 20, 0.1, test_seed=0, validation_seed=7)
    parts = [set(split.test), set(split.validation), set(split.train)]
    assert [len(p) for p in parts] == [20, 8, 72]  # round(0.1 * 80) held out of the rest
    assert set().union(*parts) == set(range(100)) and sum(map(len, parts)) == 100
    assert heldout.cut_split(100, 20, 0.1, test_seed=0, validation_seed=7) == split
    assert heldout.cut_split(100, 20, 0.1, test_seed=1, validation_seed=7).test != split.test
    # the test rows are a function of the rows, their number and the test seed only
    for fraction, seed in ((0.0, 7), (0.3, 7), (0.1, 3)):
        assert heldout.cut_split(100, 20, fraction, 0, seed).test == split.test
    # no test rows: the held-out rows are those split_rows always drew
    assert heldout.cut_split(100, 0, 0.1, 0, 7).validation == heldout.split_rows(100, 0.1, 7)


def test_test_size_counts_rows_or_a_share_and_leaves_training_rows():
    assert heldout.test_size(40, None, None) == 0
    assert heldout.test_size(40, 6, None) == 6
    assert heldout.test_size(40, None, 0.25) == 10
    assert heldout.test_size(40, None, 0.001) == 1  # asked for a test split: at least one row
    with pytest.raises(
        DeltakdError, match="--test-rows 500 leaves no training row: --train has 40"
    ):
        heldout.test_size(40, 500, None)


def test_a_cut_test_split_is_recorded_and_reused(tiny, tmp_path):
    options = PipelineOptions(
        teacher_base="t", train=str(tiny.train), test_rows=4, out=str(tmp_path / "o"),
        student="s", validation_fraction=0.2, test_seed=3,
    )  # fmt: skip
    files = heldout.hold_out(options)
    assert sorted(files) == ["test", "train", "validation"]
    record = json.loads((tmp_path / "o" / "data" / "split.json").read_text())
    train_ids = [json.loads(line)["id"] for line in open(files["train"])]
    test_ids = [json.loads(line)["id"] for line in open(files["test"])]
    assert record["test"]["seed"] == 3 and record["test"]["rows"] == 4
    assert record["test"]["ids"] == test_ids == [f"row-{n}" for n in record["test"]["row_numbers"]]
    assert not set(test_ids) & (set(train_ids) | set(record["validation_ids"]))
    assert record["train_rows"] == len(train_ids) == 24 - 4 - 4
    written = (tmp_path / "o" / "data" / "split.json").stat().st_mtime_ns
    assert heldout.hold_out(options) == files
    assert (tmp_path / "o" / "data" / "split.json").stat().st_mtime_ns == written
    # --validation given: only the test rows are cut, and no stale validation file is left
    own = heldout.hold_out(PipelineOptions(**{**vars(options), "validation": str(tiny.test)}))
    assert sorted(own) == ["test", "train"]
    assert not (tmp_path / "o" / "data" / "validation.jsonl").exists()
    assert json.loads(open(own["test"]).readline())["id"] == test_ids[0]


def test_the_split_is_reused_and_follows_its_source(tiny, tmp_path):
    options = PipelineOptions(
        teacher_base="t", train=str(tiny.train), test=str(tiny.test), out=str(tmp_path / "o"),
        student="s", validation_fraction=0.2,
    )  # fmt: skip
    first = heldout.hold_out(options)
    split = tmp_path / "o" / "data" / "split.json"
    written = split.stat().st_mtime_ns
    assert heldout.hold_out(options) == first and split.stat().st_mtime_ns == written
    rows = json.loads(split.read_text())
    assert len(rows["validation_rows"]) == round(0.2 * rows["rows"])
    other = heldout.hold_out(PipelineOptions(**{**vars(options), "seed": 5}))
    assert json.loads(split.read_text())["validation_rows"] != rows["validation_rows"]
    assert other == first  # same paths, other rows
    assert heldout.hold_out(PipelineOptions(**{**vars(options), "validation": "v.jsonl"})) == {}


def test_validation_fraction_bounds_and_a_missing_validation_file(tiny, tmp_path):
    base = [
        "pipeline", "--teacher-base", tiny.teacher_base, "--student", tiny.student,
        "--train", tiny.train, "--test", tiny.test, "--out", tmp_path / "o",
    ]  # fmt: skip
    assert_one_line_error(run_cli([*base, "--validation-fraction", 0.7]), "--validation-fraction")
    result = run_cli([*base, "--validation", tmp_path / "missing.jsonl"])
    assert_one_line_error(result, "--validation not found")
    without_test = [arg for arg in base if arg not in ("--test", tiny.test)]
    assert_one_line_error(run_cli(without_test), "give --test, or --test-rows / --test-fraction")
    assert_one_line_error(run_cli([*base, "--test-rows", 5]), "give --test or --test-rows")
    both = [*without_test, "--test-rows", 5, "--test-fraction", 0.1]
    assert_one_line_error(run_cli(both), "--test-rows or --test-fraction, not both")
    assert_one_line_error(run_cli([*without_test, "--test-fraction", 1.5]), "--test-fraction")


def test_eval_rouge_goes_to_the_trackers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    options = PipelineOptions(
        teacher_base="t", train="a", test="b", out=str(tmp_path / "o"), student="s",
        report_to="tensorboard",
    )  # fmt: skip
    results = {
        "rows": [{"role": "student-delta", "rougeL": 21.5}, {"role": "student-kd", "rougeL": 28.0}],
        "comparisons": [{"model": "student-delta", "minus": "student-kd", "difference": -6.5}],
    }
    log_results(options, results)
    events = EventAccumulator(str(tmp_path / "o" / "runs"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/rougeL/student-kd")] == [(0, 28.0)]
    (point,) = events.Scalars("eval/rougeL_difference/student-delta-minus-student-kd")
    assert point.value == -6.5


def test_the_model_card_names_inputs_training_and_result():
    record = {
        "version": "0.2.0",
        "command": "distill",
        "options": {"out": "runs/x/student-delta", "objective": "delta", "alpha": 1.0,
                    "sft_weight": 0.5, "epochs": 2, "lr": 2e-4, "batch_size": 8, "seed": 0},
        "resolved": {"total_steps": 26, "world_size": 1, "compute_dtype": "float32",
                     "exported_step": 20},
        "student": {"spec": "runs/x/student-base", "weights_sha256": "ab" * 32},
        "provenance": {
            "cache": {"path": "/c", "k": 64, "selection": "target", "tail_rule": "mass-matched",
                      "counts": {"response_tokens": 2518}, "manifest_sha256": "cd" * 32},
            "cache_provenance": {
                "teacher_base": {"spec": "Qwen/Qwen2.5-7B", "weights_sha256": "ef" * 32},
                "teacher_tuned": {"spec": "Qwen/Qwen2.5-7B-Instruct", "weights_sha256": "12" * 32},
                "data": {"path": "train.jsonl", "sha256": "34" * 32},
            },
        },
        "final_metrics": {"target_tokens": 5036, "final_loss": 1.2762, "eval_loss": 1.5,
                          "best_eval_loss": 1.4},
    }  # fmt: skip
    card = model_card(record, {"rouge_l": 21.73, "rows": 50, "protocol": "greedy", "report": "r"})
    for fragment in (
        "Delta-KD", "`Qwen/Qwen2.5-7B`", "`Qwen/Qwen2.5-7B-Instruct`", "`efefefefefef`",
        "`343434343434`", "top-64", "| alpha | 1.0 |", "| steps | 26 |", "5,036",
        "| held-out loss (last) | 1.5000 |", "step 20) | 1.4000 |", "ROUGE-L **21.73**",
        "deltakd distill --config student-delta/run.json",
    ):  # fmt: skip
        assert fragment in card, fragment
    assert "## Evaluation" not in model_card(record)
