"""Evaluation: protocol presets, the paired bootstrap, batched generation, reports, predictions."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch

from deltakd_cli import data, evaluate, models, rouge
from deltakd_cli.errors import DeltakdError

# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_covers_the_true_difference_at_about_the_stated_rate():
    rng = np.random.default_rng(1234)
    true_difference, covered, datasets = 2.0, 0, 200
    for index in range(datasets):
        shared = rng.normal(30.0, 10.0, size=50)  # row difficulty both models share
        a = shared + rng.normal(0.0, 6.0, size=50)
        b = shared + true_difference + rng.normal(0.0, 6.0, size=50)
        result = evaluate.paired_bootstrap(a, b, n_resamples=1000, seed=index)
        covered += result["ci_low"] <= true_difference <= result["ci_high"]
    assert 0.88 <= covered / datasets <= 0.99


def test_bootstrap_is_reproducible_and_centred():
    rng = np.random.default_rng(0)
    a, b = rng.normal(20, 5, size=40), rng.normal(22, 5, size=40)
    first = evaluate.paired_bootstrap(a, b, n_resamples=2000, seed=7)
    again = evaluate.paired_bootstrap(a, b, n_resamples=2000, seed=7)
    other = evaluate.paired_bootstrap(a, b, n_resamples=2000, seed=8)
    assert first == again
    assert (first["ci_low"], first["ci_high"]) != (other["ci_low"], other["ci_high"])
    assert first["difference"] == pytest.approx(float(np.mean(b - a)))
    assert first["ci_low"] < first["difference"] < first["ci_high"]
    assert first["n_rows"] == 40 and first["seed"] == 7 and first["confidence"] == 0.95


def test_bootstrap_is_paired():
    # b beats a by exactly 1 on every row, while rows vary a lot: a paired interval is [1, 1];
    # resampling the two models independently would give a wide one.
    a = np.random.default_rng(3).normal(30, 15, size=30)
    result = evaluate.paired_bootstrap(a, a + 1.0, n_resamples=500)
    assert result["ci_low"] == pytest.approx(1.0) and result["ci_high"] == pytest.approx(1.0)


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError):
        evaluate.paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        evaluate.paired_bootstrap([], [])
    with pytest.raises(ValueError):
        evaluate.paired_bootstrap([1.0], [float("nan")])
    with pytest.raises(ValueError):
        evaluate.paired_bootstrap([1.0], [2.0], confidence=1.0)


def test_mean_and_sample_std():
    values = [20.0, 22.5, 19.0, 24.0, 21.0]
    mean, std = evaluate.mean_and_std(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert std == pytest.approx(statistics.stdev(values))
    assert evaluate.mean_and_std([3.0]) == (3.0, None)


# --------------------------------------------------------------------------- protocol


def test_minillm_preset_is_the_published_protocol():
    protocol = evaluate.make_protocol("minillm")
    assert protocol.is_published
    kwargs = protocol.generate_kwargs()
    assert kwargs["do_sample"] is True
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (1.0, 1.0, 0)
    assert kwargs["max_new_tokens"] == 256 and protocol.max_prompt_length == 256
    assert kwargs["repetition_penalty"] == 1.0  # a checkpoint's own setting cannot leak in
    assert protocol.seeds == (10, 20, 30, 40, 50)
    report = protocol.to_report()
    assert report["seeds"] == [10, 20, 30, 40, 50] and report["matches_published_protocol"]
    assert not evaluate.make_protocol("minillm", max_new_tokens=64).is_published


def test_greedy_preset_and_bad_settings():
    greedy = evaluate.make_protocol("greedy", max_new_tokens=16)
    assert greedy.seeds == (None,) and not greedy.generate_kwargs()["do_sample"]
    assert greedy.to_report()["seeds"] == [] and not greedy.is_published
    for kwargs, message in [
        ({"name": "beam"}, "unknown protocol"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be a positive integer"),
        ({"max_prompt_length": -3}, "--max-prompt-length must be a positive integer"),
        ({"batch_size": 0}, "--batch-size must be a positive integer"),
        ({"template": "vicuna"}, "unknown template"),
        ({"name": "greedy", "seeds": "1,2"}, "--seeds needs sampling"),
    ]:
        with pytest.raises(DeltakdError, match=message):
            evaluate.make_protocol(**kwargs)


def test_parse_seeds():
    assert evaluate.parse_seeds("10,20, 30") == (10, 20, 30)
    assert evaluate.parse_seeds("0") == (0,)
    for bad in ["", "1,,2", "a,b", "1.5", "-1", "3,3", "10;20"]:
        with pytest.raises(DeltakdError, match="--seeds"):
            evaluate.parse_seeds(bad)


def test_batching_helpers():
    lengths = [3, 9, 1, 9, 5, 2, 7]
    batches = evaluate.length_batches(lengths, 3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert batches[0] == [1, 3, 6]  # longest first, ties by row
    assert evaluate.batch_seed(10, 0) == evaluate.batch_seed(10, 0)
    assert len({evaluate.batch_seed(s, b) for s in (10, 20) for b in range(50)}) == 100
    assert evaluate.cut_at_eos([5, 6, 2, 7, 0], [2, 9]) == [5, 6]
    assert evaluate.cut_at_eos([5, 6], [2]) == [5, 6]
    ids, mask = evaluate.left_pad([[4, 5, 6], [7]], 0, torch.device("cpu"))
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# --------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def teacher(tiny):
    """teacher_base answers differently for each prompt under the plain template, so rows
    mixed up by batching would show."""
    tokenizer = models.load_tokenizer(str(tiny.teacher_base))
    model = models.load_model(str(tiny.teacher_base))
    prompts = evaluate.prepare_prompts(data.load_examples(tiny.test), "plain", tokenizer, 256)
    return model, tokenizer, [p.ids for p in prompts]


def _greedy(max_new_tokens=8, batch_size=8):
    return evaluate.make_protocol(
        "greedy", max_new_tokens=max_new_tokens, batch_size=batch_size, template="plain"
    )


def test_batched_greedy_equals_one_by_one(teacher):
    model, tokenizer, prompts = teacher
    batched = evaluate.generate_texts(model, tokenizer, prompts, _greedy(batch_size=3), None)
    single = [
        evaluate.generate_texts(model, tokenizer, [p], _greedy(batch_size=1), None)[0]
        for p in prompts
    ]
    assert batched == single
    assert len(set(batched)) > len(prompts) // 2  # the rows really differ


def test_model_generation_config_does_not_change_the_protocol(teacher):
    model, tokenizer, prompts = teacher
    plain = evaluate.generate_texts(model, tokenizer, prompts, _greedy(), None)
    saved = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 50.0
    try:
        again = evaluate.generate_texts(model, tokenizer, prompts, _greedy(), None)
    finally:
        model.generation_config.repetition_penalty = saved
    assert again == plain


def test_generation_stops_at_eos_per_row(teacher):
    model, tokenizer, prompts = teacher
    ids, mask = evaluate.left_pad(prompts[:1], tokenizer.pad_token_id, torch.device("cpu"))
    tokens = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8)[
        0, ids.shape[1] :
    ].tolist()
    stop = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = tokens[stop]  # pretend this token ends the answer
    try:
        texts = evaluate.generate_texts(model, tokenizer, prompts[:2], _greedy(), None)
    finally:
        model.generation_config.eos_token_id = saved
    assert texts[0] == tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip()


def test_sampling_is_reproducible_under_a_seed(teacher):
    model, tokenizer, prompts = teacher
    protocol = evaluate.make_protocol(
        "minillm", max_new_tokens=8, batch_size=4, template="plain", seeds="1,2"
    )
    torch.manual_seed(99)
    before = torch.rand(3)
    torch.manual_seed(99)
    first = evaluate.generate_texts(model, tokenizer, prompts, protocol, 1)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG state is untouched
    assert evaluate.generate_texts(model, tokenizer, prompts, protocol, 1) == first
    other = evaluate.generate_texts(model, tokenizer, prompts, protocol, 2)
    assert other != first


def test_prompts_are_cut_from_the_left(tiny):
    tokenizer = models.load_tokenizer(str(tiny.student))
    examples = data.load_examples(tiny.test)[:2]
    full = evaluate.prepare_prompts(examples, "alpaca", tokenizer, 10_000)
    cut = evaluate.prepare_prompts(examples, "alpaca", tokenizer, 5)
    for whole, short in zip(full, cut, strict=True):
        assert not whole.truncated and short.truncated
        assert short.ids == whole.ids[-5:] and short.text == whole.text


# --------------------------------------------------------------------------- reports

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
    protocol = evaluate.make_protocol(
        "minillm", seeds="3,4", max_new_tokens=6, batch_size=3, template="plain"
    )
    specs = [str(tiny.student), str(tiny.teacher_base)]
    report, records = evaluate.evaluate_models(specs, tiny.test, protocol, limit=4, device="cpu")
    out = tmp_path_factory.mktemp("eval") / "run" / "report.json"
    paths = evaluate.write_outputs(report, records, out)
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
    assert difference["model"] == specs[1] and difference["baseline"] == specs[0]
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
    assert written["data"]["sha256"] == data.file_sha256(tiny.test)
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
    for key in ("difference", "ci_low", "ci_high", "confidence", "n_resamples", "excludes_zero"):
        assert key in written["differences"][0]
    lines = [json.loads(line) for line in records_path.read_text().splitlines()]
    assert len(lines) == len(records)
    assert all(set(line) == RECORD_FIELDS for line in lines)


def test_scoring_the_generations_file_reproduces_the_report(two_model_run, tiny):
    specs, report, _, (_, records_path) = two_model_run
    rescored, records = evaluate.evaluate_predictions(records_path, tiny.test, limit=4)
    assert rescored["predictions"]["matched_by"] == "id"
    assert [m["name"] for m in rescored["models"]] == specs
    for before, after in zip(report["models"], rescored["models"], strict=True):
        assert after["per_seed"] == before["per_seed"] and after["mean"] == before["mean"]
    assert rescored["differences"] == report["differences"]


def test_greedy_report_has_one_run_and_no_std(tiny):
    report, records = evaluate.evaluate_models(
        [str(tiny.student)], tiny.test, _greedy(max_new_tokens=4), limit=2, device="cpu"
    )
    (summary,) = report["models"]
    assert summary["n_seeds"] == 1 and summary["per_seed"][0]["seed"] is None
    assert summary["std"]["rougeL"] is None and report["differences"] == []
    assert [r["seed"] for r in records] == [None, None]


# --------------------------------------------------------------------------- predictions


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
    report, records = evaluate.evaluate_predictions(ordered, small_data)
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
    report, records = evaluate.evaluate_predictions(
        _write(tmp_path / "s.jsonl", shuffled), small_data, baseline="base"
    )
    assert [m["name"] for m in report["models"]] == ["m", "base"]
    assert report["baseline"] == "base" and report["differences"][0]["model"] == "m"
    by_model = {m["name"]: m for m in report["models"]}
    assert by_model["m"]["mean"]["exact_match"] == pytest.approx(200 / 3)
    assert by_model["base"]["mean"]["rougeL"] == 0.0
    assert records[0]["id"] == "q1"
    assert records[0]["prompt"].startswith("Below is an instruction")  # rendered under alpaca

    limited, _ = evaluate.evaluate_predictions(
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
        evaluate.evaluate_predictions(path, small_data)


def test_bad_eval_inputs(tiny, tmp_path, small_data):
    protocol = _greedy(max_new_tokens=2)
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
            evaluate.evaluate_models(*args, device="cpu")
    with pytest.raises(DeltakdError, match="--baseline other is not one of the models"):
        evaluate.evaluate_models([str(tiny.student)], tiny.test, protocol, baseline="other")
    with pytest.raises(DeltakdError, match="--limit must be a positive integer"):
        evaluate.evaluate_models([str(tiny.student)], tiny.test, protocol, limit=0)
    with pytest.raises(DeltakdError, match="is a directory"):
        evaluate.prepare_output(tmp_path)
    assert evaluate.generations_path(tmp_path / "r.json").name == "r.generations.jsonl"
    assert evaluate.generations_path(tmp_path / "r").name == "r.generations.jsonl"
