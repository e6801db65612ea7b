"""evaluate/predictions.py: generations made elsewhere, matched by order or id, and every
misalignment named."""

from __future__ import annotations

import json

import pytest
from helpers import greedy_protocol

from deltakd_cli.errors import DeltakdError
from deltakd_cli.evaluate import report, run
from deltakd_cli.evaluate.options import EvalOptions


def _write(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture()
def small_data(tmp_path):
    rows = [
        {"id": "q1", "prompt": "say a", "response": "alpha"},
        {"id": "q2", "prompt": "say b", "references": ["beta", "bravo"]},
        {"id": "q3", "prompt": "say c", "response": "gamma ray"},
    ]
    return _write(tmp_path / "small.jsonl", rows)


def test_predictions_by_order_and_by_id(small_data, tmp_path):
    ordered = _write(tmp_path / "p.jsonl", [{"prediction": t} for t in ("alpha", "bravo", "x")])
    report, records = run.evaluate_predictions(ordered, small_data)
    assert report["predictions"]["matched_by"] == "order"
    (summary,) = report["models"]
    assert summary["name"] == "p" and summary["mean"]["exact_match"] == pytest.approx(200 / 3)
    assert [r["id"] for r in records] == ["q1", "q2", "q3"]

    shuffled = [
        {"id": "q3", "prediction": "gamma", "model": "m", "seed": 1},
        {"id": "q1", "prediction": "alpha", "model": "m", "seed": 1},
        {"id": "q2", "prediction": "beta", "model": "m", "seed": 1},
        {"id": "q2", "prediction": "nope", "model": "base"},
        {"id": "q1", "prediction": "nope", "model": "base"},
        {"id": "q3", "prediction": "nope", "model": "base"},
    ]
    report, records = run.evaluate_predictions(
        _write(tmp_path / "s.jsonl", shuffled), small_data, baseline="base"
    )
    assert [m["name"] for m in report["models"]] == ["m", "base"]
    assert report["baseline"] == "base" and report["differences"][0]["model"] == "m"
    by_model = {m["name"]: m for m in report["models"]}
    assert by_model["m"]["mean"]["exact_match"] == pytest.approx(200 / 3)
    assert by_model["base"]["mean"]["rougeL"] == 0.0
    assert records[0]["id"] == "q1"
    assert records[0]["prompt"].startswith("Below is an instruction")  # rendered under alpaca

    limited, _ = run.evaluate_predictions(
        _write(tmp_path / "l.jsonl", shuffled[:3]), small_data, limit=2
    )
    assert limited["data"]["rows"] == 2 and limited["models"][0]["mean"]["exact_match"] == 100.0


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            [{"prediction": "a"}, {"prediction": "b"}],
            r"p\.jsonl: model p, seed None has 2 predictions but the data has 3 rows "
            r"\(first row without one: id 'q3'\)",
        ),
        ([{"prediction": t} for t in "abcd"], r"first extra line .*p\.jsonl:4"),
        ([{"id": "q1", "prediction": "a"}, {"prediction": "b"}], r"p\.jsonl:2: no 'id' field"),
        ([{"id": "q9", "prediction": "a"}], r"p\.jsonl:1: id 'q9' is not in the data"),
        (
            [{"id": "q1", "prediction": "a"}, {"id": "q1", "prediction": "b"}],
            r"p\.jsonl:2: a second prediction for id 'q1'",
        ),
        (
            [{"id": "q1", "prediction": "a"}, {"id": "q3", "prediction": "c"}],
            r"no prediction for id 'q2' \(1 of 3 rows missing\)",
        ),
        ([{"id": "q1", "text": "a"}], r"p\.jsonl:1: needs a string field 'prediction'"),
        (
            [{"id": "q1", "prediction": "a", "seed": "ten"}],
            r"p\.jsonl:1: 'seed' must be an integer",
        ),
        (
            [
                {"prediction": "a", "references": ["not alpha"]},
                {"prediction": "b"},
                {"prediction": "c"},
            ],
            r"p\.jsonl:1: its 'references' differ",
        ),
        ([], r"no predictions \(the file is empty\)"),
    ],
)
def test_misaligned_predictions_name_the_first_bad_line(small_data, tmp_path, lines, message):
    path = _write(tmp_path / "p.jsonl", lines)
    with pytest.raises(DeltakdError, match=message):
        run.evaluate_predictions(path, small_data)


def test_bad_eval_inputs(tiny, tmp_path, small_data):
    protocol = greedy_protocol(max_new_tokens=2)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    no_reference = _write(tmp_path / "noref.jsonl", [{"prompt": "only a prompt"}])
    cases = [
        (([str(tiny.student)], empty, protocol), "no examples"),
        (([str(tiny.student)], no_reference, protocol), "noref.jsonl:1: the row has no response"),
        (([str(tmp_path / "missing-model")], tiny.test, protocol), "model not found"),
        (([str(tmp_path)], tiny.test, protocol), "not a model directory"),
        (([str(tiny.student), str(tiny.student)], tiny.test, protocol), "given twice"),
        (([], tiny.test, protocol), "at least one --model"),
    ]
    for args, message in cases:
        with pytest.raises(DeltakdError, match=message):
            run.evaluate_models(*args, device="cpu")
    with pytest.raises(DeltakdError, match="--baseline other is not one of the models"):
        run.evaluate_models([str(tiny.student)], tiny.test, protocol, baseline="other")
    with pytest.raises(DeltakdError, match="--limit must be at least 1, got 0"):
        run.run_eval(EvalOptions(model=[str(tiny.student)], data=str(tiny.test), limit=0))
    with pytest.raises(DeltakdError, match="is a directory"):
        report.prepare_output(tmp_path)
    assert report.generations_path(tmp_path / "r.json").name == "r.generations.jsonl"
    assert report.generations_path(tmp_path / "r").name == "r.generations.jsonl"
