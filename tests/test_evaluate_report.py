"""evaluate/report.py and run.py: the report's numbers follow from its records; the files have
the documented fields; scoring the generations file again reproduces the report."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from helpers import greedy_protocol

from deltakd_cli import sources
from deltakd_cli.data import Example
from deltakd_cli.evaluate import protocol as protocols
from deltakd_cli.evaluate import report as report_files
from deltakd_cli.evaluate import rouge, run

RECORD_FIELDS = {
    "id",
    "row",
    "model",
    "seed",
    "prompt",
    "prediction",
    "references",
    "rougeL",
    "rouge1",
    "rouge2",
    "exact_match",
}


@pytest.fixture(scope="module")
def two_model_run(tiny, tmp_path_factory):
    protocol = protocols.make_protocol(
        "minillm", seeds="3,4", max_new_tokens=6, batch_size=3, template="plain"
    )
    specs = [str(tiny.student), str(tiny.teacher_base)]
    report, records = run.evaluate_models(specs, tiny.test, protocol, limit=4, device="cpu")
    out = tmp_path_factory.mktemp("eval") / "run" / "report.json"
    paths = report_files.write_outputs(report, records, out)
    return specs, report, records, paths


def test_report_numbers_follow_from_the_records(two_model_run):
    specs, report, records, _ = two_model_run
    assert len(records) == 2 * 2 * 4
    assert [m["name"] for m in report["models"]] == specs
    for summary in report["models"]:
        assert summary["n_rows"] == 4 and summary["n_seeds"] == 2
        per_seed = []
        for entry in summary["per_seed"]:
            rows = [
                r for r in records if r["model"] == summary["name"] and r["seed"] == entry["seed"]
            ]
            assert [r["row"] for r in rows] == [0, 1, 2, 3]
            expected = rouge.corpus_rouge_l(
                [r["prediction"] for r in rows], [r["references"] for r in rows]
            )
            assert entry["rougeL"] == pytest.approx(expected)
            per_seed.append(entry["rougeL"])
        assert summary["mean"]["rougeL"] == pytest.approx(statistics.mean(per_seed))
        assert summary["std"]["rougeL"] == pytest.approx(statistics.stdev(per_seed))
        assert summary["identity"]["weights_sha256"]
    (difference,) = [d for d in report["differences"] if d["metric"] == "rougeL"]
    assert difference["model"] == specs[1] and difference["minus"] == specs[0]
    mean_of = {m["name"]: m["mean"]["rougeL"] for m in report["models"]}
    assert difference["difference"] == pytest.approx(mean_of[specs[1]] - mean_of[specs[0]])


def test_report_and_generations_files_have_the_documented_fields(two_model_run, tiny):
    _, report, records, (report_path, records_path) = two_model_run
    assert records_path.name == "report.generations.jsonl"
    assert records_path.parent == report_path.parent
    written = json.loads(report_path.read_text())
    for key in (
        "tool",
        "created",
        "mode",
        "data",
        "metrics",
        "protocol",
        "models",
        "baseline",
        "bootstrap",
        "differences",
        "generations_file",
    ):
        assert key in written
    assert written["tool"]["name"] == "deltakd" and written["tool"]["version"]
    assert written["data"]["sha256"] == sources.file_sha256(tiny.test)
    assert written["data"]["rows"] == 4 and written["data"]["limit"] == 4
    protocol = written["protocol"]
    assert protocol["seeds"] == [3, 4] and protocol["top_k"] == 0 and protocol["device"] == "cpu"
    assert protocol["max_new_tokens"] == 6 and protocol["matches_published_protocol"] is False
    model = written["models"][0]
    for key in (
        "name",
        "n_rows",
        "n_seeds",
        "per_seed",
        "mean",
        "std",
        "identity",
        "prompts_truncated",
    ):
        assert key in model
    assert set(model["mean"]) == set(rouge.METRICS)
    for key in ("model", "minus", "difference", "ci_low", "ci_high", "confidence", "n_resamples",
                "beyond_noise"):  # fmt: skip
        assert key in written["differences"][0]
    lines = [json.loads(line) for line in records_path.read_text().splitlines()]
    assert len(lines) == len(records)
    assert all(set(line) == RECORD_FIELDS for line in lines)


def test_scoring_the_generations_file_reproduces_the_report(two_model_run, tiny):
    specs, report, _, (_, records_path) = two_model_run
    rescored, records = run.evaluate_predictions(records_path, tiny.test, limit=4)
    assert rescored["predictions"]["matched_by"] == "id"
    assert [m["name"] for m in rescored["models"]] == specs
    for before, after in zip(report["models"], rescored["models"], strict=True):
        assert after["per_seed"] == before["per_seed"] and after["mean"] == before["mean"]
    assert rescored["differences"] == report["differences"]


def test_greedy_report_has_one_run_and_no_std(tiny):
    report, records = run.evaluate_models(
        [str(tiny.student)], tiny.test, greedy_protocol(max_new_tokens=4), limit=2, device="cpu"
    )
    (summary,) = report["models"]
    assert summary["n_seeds"] == 1 and summary["per_seed"][0]["seed"] is None
    assert summary["std"]["rougeL"] is None and report["differences"] == []
    assert [r["seed"] for r in records] == [None, None]


@pytest.mark.parametrize(
    ("template", "said", "not_said"),
    [
        ("alpaca", "Alpaca prompt cut from the left to 128 tokens", "chat template"),
        ("chat", "each model's chat template cut from the left to 128 tokens", "Alpaca"),
        ("plain", "plain prompt (no template) cut from the left to 128 tokens", "Alpaca"),
    ],
)
def test_protocol_line_names_the_template_that_ran(template, said, not_said):
    """The printed protocol (pipeline summary, report page) is the one the eval recorded: a
    `template: chat` run printed "Alpaca prompt" (issue 27)."""
    recorded = protocols.make_protocol(
        "minillm", seeds="1,2", max_prompt_length=128, max_new_tokens=32, template=template
    ).to_report()
    line = report_files.protocol_line(recorded, 7)
    assert said in line and not_said not in line
    assert "seeds 1,2" in line and "7 rows" in line and "up to 32 new tokens" in line
    assert "NOT the published protocol" in line  # seeds and lengths differ from the paper's


def test_protocol_line_names_a_borrowed_chat_template_and_greedy():
    recorded = protocols.make_protocol("greedy", template="chat").to_report()
    recorded["template_from"] = "org/instruct"
    line = report_files.protocol_line(recorded, 3)
    assert "greedy decoding" in line and "the chat template of org/instruct" in line
    recorded["template_from"] = "/home/me/models/teacher-tuned"  # a card never shows a path
    line = report_files.protocol_line(recorded, 3)
    assert "the chat template of teacher-tuned" in line and "/home" not in line
    assert "seeds" not in line


def test_protocol_line_of_an_alpaca_prompt_in_another_models_tokenizer():
    """The demo evaluates the Alpaca prompt with the tuned teacher's tokenizer (--template-from):
    its line said "the chat template of teacher-tuned"."""
    recorded = protocols.make_protocol("greedy", template="alpaca").to_report()
    recorded["template_from"] = "runs/demo/models/teacher-tuned"
    line = report_files.protocol_line(recorded, 50)
    assert "Alpaca prompt in the tokenizer of teacher-tuned" in line
    assert "chat template" not in line


def test_protocol_line_of_the_published_protocol_says_so():
    line = report_files.protocol_line(protocols.make_protocol("minillm").to_report(), 5)
    assert "Alpaca prompt cut from the left to 256 tokens" in line
    assert "seeds 10,20,30,40,50" in line and "the published MiniLLM/DistiLLM protocol" in line


def test_tables_show_short_labels_and_the_paths_below(tmp_path):
    """Issue 27: the eval tables showed each model's full path, wrapped mid-name in a log and at
    80 columns. Now the last part of the path, whole, and the paths in the caption."""
    from rich.console import Console

    models = [f"/very/long/experiment/directory/of/students/{n}" for n in ("sft", "kd", "delta")]
    examples = [Example(id=f"r{i}", instruction="t", references=["a b c"]) for i in range(3)]
    records = [
        report_files.make_record(example, row, model, None, "p", "a b")
        for model in models
        for row, example in enumerate(examples)
    ]
    data = tmp_path / "test.jsonl"
    data.write_text('{"prompt": "t", "response": "a b c"}\n')
    report = report_files.assemble(
        "generate", data, examples, None, records, models, models[0],
        {"protocol": None, "predictions": {"path": "p.jsonl"}},
    )  # fmt: skip
    console = Console(width=80, record=True, force_terminal=False)
    for table in report_files.report_tables(report):
        console.print(table)
    text = console.export_text()
    lines = text.splitlines()
    for name in ("sft", "kd", "delta"):
        assert any(line.startswith(f"│ {name} ") for line in lines), text
    for model in models:
        assert f"{Path(model).name}: {model}" in text  # the caption names each path once
