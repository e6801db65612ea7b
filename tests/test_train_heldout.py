"""Held-out loss during training (`--eval-data`, `--eval-every`, `--keep-best`): computed on the
held-out examples only, equal to a direct computation with the exported model, and the best
weights exported when asked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, cache_args, run_cli, train_and_held_out_caches
from transformers import AutoModelForCausalLM

from deltakd_cli import data, models
from deltakd_cli.cache.reader import CacheReader
from deltakd_cli.method.objectives import OBJECTIVES
from deltakd_cli.method.spec import CacheFacts, tail_estimator
from deltakd_cli.option_groups import DataOptions
from deltakd_cli.train import batching
from deltakd_cli.train.objective import chunk_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def caches(tiny, tmp_path_factory):
    """A training cache of the train rows and a held-out cache of the test rows."""
    return train_and_held_out_caches(tiny, tmp_path_factory.mktemp("heldout"))


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def direct_held_out_loss(model_dir: Path, cache: Path, objective: str, sft_weight: float) -> dict:
    """The objective over every example of `cache`, one example at a time through the Hugging
    Face forward (full logits, no padding, no chunks), on the objective's default tail (the
    cache has draws): the reference the trainer must match."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reader = CacheReader(cache)
    vocab = int(reader.manifest["vocab_size"])
    assert reader.tail_samples > 0
    tail = tail_estimator(OBJECTIVES[objective].default_tail)
    facts = CacheFacts(float(reader.manifest["alpha"]), reader.grid_points, reader.temperature)
    sums = {"loss": 0.0, "sft": 0.0, "distill": 0.0}
    count = 0
    for shard in range(reader.num_shards):
        for example in reader.read_examples(shard, 0, len(reader.shard_lengths(shard))):
            batch = batching.collate([example], pad_id=0, with_student=True)
            with torch.no_grad():
                logits = model(torch.as_tensor(example.input_ids)[None]).logits[0]
            positions = torch.as_tensor(data.target_positions(example.target_mask))
            parts = chunk_loss(
                objective,
                logits[positions, :vocab],
                batch["labels"],
                batch["cached"],
                tail=tail,
                sft_weight=sft_weight,
                facts=facts,
            )
            for name in sums:
                sums[name] += float(parts[name].double().sum())
            count += len(positions)
    return {name: value / count for name, value in sums.items()} | {"targets": count}


@pytest.mark.parametrize("objective", ["kd", "delta"])
def test_held_out_loss_is_the_objective_on_the_held_out_rows(tiny, caches, tmp_path, objective):
    train, held_out = caches
    out = tmp_path / objective
    result = run_cli(
        [
            "distill", "--cache", train, "--student", tiny.student, "--out", out,
            "--objective", objective, "--sft-weight", 0.25, "--lr", "5e-3", "--batch-size", 3,
            "--max-steps", 5, "--eval-data", held_out, "--eval-every", 2,
            "--num-workers", 0, "--device", "cpu",
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = read_metrics(out)
    evaluated = [line["step"] for line in lines if "eval_loss" in line]
    assert evaluated == [2, 4, 5]  # every 2 steps and at the end
    last = lines[-1]
    expected = direct_held_out_loss(out, held_out, objective, 0.25)
    held_out_targets = json.loads((held_out / "manifest.json").read_text())["counts"]
    assert last["eval_target_tokens"] == expected["targets"]
    assert expected["targets"] == held_out_targets["response_tokens"]
    assert last["eval_loss"] == pytest.approx(expected["loss"], rel=1e-4)
    assert last["eval_sft"] == pytest.approx(expected["sft"], rel=1e-4)
    assert last["eval_distill"] == pytest.approx(expected["distill"], rel=1e-4, abs=1e-6)
    # the training rows give another number: the held-out loss saw only the held-out rows
    on_train = direct_held_out_loss(out, train, objective, 0.25)
    assert not math.isclose(on_train["loss"], last["eval_loss"], rel_tol=1e-3)
    run = json.loads((out / "run.json").read_text())
    assert run["resolved"]["tail"] == OBJECTIVES[objective].default_tail  # the reference's
    assert run["final_metrics"]["eval_loss"] == last["eval_loss"]
    assert run["provenance"]["eval_data"]["cache"]["path"] == str(held_out.resolve())


@pytest.mark.slow
def test_the_held_out_loss_does_not_change_training(tiny, caches, tmp_path):
    train, held_out = caches
    common = [
        "distill", "--cache", train, "--student", tiny.student, "--lr", "5e-3",
        "--batch-size", 3, "--max-steps", 4, "--num-workers", 0, "--device", "cpu",
    ]  # fmt: skip
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    assert run_cli([*common, "--out", plain]).exit_code == 0
    args = [*common, "--out", watched, "--eval-data", held_out, "--eval-every", 1]
    assert run_cli(args).exit_code == 0
    from safetensors.torch import load_file

    a, b = load_file(plain / "model.safetensors"), load_file(watched / "model.safetensors")
    assert all(a[name].equal(b[name]) for name in a)
    assert [line["loss"] for line in read_metrics(plain)] == [
        line["loss"] for line in read_metrics(watched)
    ]


@pytest.mark.slow
def test_keep_best_exports_the_lowest_held_out_loss(tiny, caches, tmp_path):
    train, held_out = caches
    out = tmp_path / "best"
    result = run_cli(
        [
            "distill", "--cache", train, "--student", tiny.student, "--out", out,
            "--objective", "kd", "--lr", "0.3", "--batch-size", 3, "--max-steps", 6,
            "--warmup", 0, "--eval-data", held_out, "--eval-every", 1, "--keep-best",
            "--num-workers", 0, "--device", "cpu",
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = read_metrics(out)
    best = min(lines, key=lambda line: line["eval_loss"])
    run = json.loads((out / "run.json").read_text())
    assert run["resolved"]["exported_step"] == best["step"]
    assert run["final_metrics"]["best_eval_loss"] == best["eval_loss"]
    exported = direct_held_out_loss(out, held_out, "kd", 0.0)
    assert exported["loss"] == pytest.approx(best["eval_loss"], rel=1e-4)


def test_finetune_held_out_loss_is_the_cross_entropy_of_the_held_out_rows(tiny, tmp_path):
    out = tmp_path / "tuned"
    result = run_cli(
        [
            "finetune", "--model", tiny.student, "--data", tiny.train, "--out", out,
            "--lr", "1e-2", "--batch-size", 4, "--max-steps", 3, "--eval-data", tiny.test,
            "--device", "cpu",
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    last = read_metrics(out)[-1]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = models.load_tokenizer(str(out))
    run = json.loads((out / "run.json").read_text())
    examples = data.load_examples(DataOptions().data_source(str(tiny.test)))
    tokenized = data.tokenize_all(
        examples, run["options"]["template"], tokenizer, run["options"]["max_length"], "all"
    )
    total, count = 0.0, 0
    for example in tokenized:
        ids = torch.as_tensor(example.input_ids)
        positions = torch.as_tensor(data.target_positions(example.target_mask))
        with torch.no_grad():
            logits = model(ids[None]).logits[0]
        total += float(
            torch.nn.functional.cross_entropy(
                logits[positions], ids[positions + 1], reduction="sum"
            )
        )
        count += len(positions)
    assert last["eval_target_tokens"] == count
    assert last["eval_loss"] == pytest.approx(total / count, rel=1e-4)
    assert last["eval_sft"] == last["eval_loss"]


def test_held_out_options_need_held_out_data(tiny, caches, tmp_path):
    train, held_out = caches
    base = ["distill", "--cache", train, "--student", tiny.student, "--out", tmp_path / "o"]
    assert_one_line_error(run_cli([*base, "--keep-best"]), "--keep-best needs --eval-data")
    assert_one_line_error(run_cli([*base, "--eval-every", 3]), "--eval-every needs --eval-data")
    # a held-out cache built without the student's log-probs gives another target
    no_student = tmp_path / "no-student"
    assert run_cli(cache_args(tiny, no_student, "--top-k", 8, student=False)).exit_code == 0
    result = run_cli([*base, "--eval-data", no_student, "--device", "cpu"])
    assert_one_line_error(result, "--eval-data", "does not match the training data")
