"""examples/qwen2.5-7b-dolly.yaml on a local parquet copy of Dolly-shaped rows: its column
settings cache instruction + context (never the instruction alone), and its test rows are cut
from the training rows, disjoint from them and from the held-out rows."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pandas as pd
import pytest
from conftest import WORDS
from helpers import REPO, cache_args, flat, run_cli

from deltakd_cli import config, data, models
from deltakd_cli.cache.reader import CacheReader
from deltakd_cli.options import REQUIRED, option_fields
from deltakd_cli.pipeline import heldout
from deltakd_cli.pipeline.options import PipelineOptions
from deltakd_cli.pipeline.plan import plan_stages

DOLLY_EXAMPLE = REPO / "examples" / "qwen2.5-7b-dolly.yaml"
# The example's settings that decide how a row becomes tokens.
ROW_SETTINGS = ("prompt_field", "context_field", "response_field", "template", "template_from")


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def dolly_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows shaped as databricks-dolly-15k's: instruction, context (never empty here),
    response, category."""
    rng = random.Random(seed)
    return [
        {
            "instruction": _words(rng, 3, 6),
            "context": "river mountain " + _words(rng, 4, 8),
            "response": _words(rng, 2, 5),
            "category": "closed_qa",
        }
        for _ in range(count)
    ]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_parquet(str(path))
    return path


def example_values() -> dict:
    return config.load(DOLLY_EXAMPLE, "pipeline", PipelineOptions)


def example_cache_flags() -> list[str]:
    values = example_values()
    flags = []
    for name in ROW_SETTINGS:
        flags += [f"--{name.replace('_', '-')}", str(values[name])]
    return flags


def cached(out: Path) -> list:
    reader = CacheReader(str(out))
    return sorted(
        (
            example
            for shard in range(reader.num_shards)
            for example in reader.read_examples(shard, 0, len(reader.shard_lengths(shard)))
        ),
        key=lambda example: example.example_index,
    )


def test_the_dolly_example_caches_instruction_and_context(tiny, tmp_path):
    rows = dolly_rows(10)
    with_context = write_parquet(tmp_path / "dolly.parquet", rows)
    blank = write_parquet(
        tmp_path / "dolly-blank.parquet", [{**row, "context": ""} for row in rows]
    )
    caches = {}
    for name, path in (("context", with_context), ("blank", blank)):
        args = cache_args(tiny, tmp_path / name, *example_cache_flags(), student=False)
        args[args.index("--data") + 1] = str(path)
        result = run_cli(args)
        assert result.exit_code == 0, result.output
        assert "leaves out" not in flat(result.output)  # nothing of a Dolly row goes unread
        caches[name] = cached(tmp_path / name)
    tokenizer = models.load_tokenizer(str(tiny.teacher_tuned))
    values = example_values()
    # The reference: the same rows read as Dolly rows by their own names, no mapping at all.
    references = data.tokenize_all(
        data.load_examples(str(with_context)), values["template"], tokenizer, 1024
    )
    assert [e.input_ids.tolist() for e in caches["context"]] == [r.input_ids for r in references]
    for example, blanked, row in zip(caches["context"], caches["blank"], rows, strict=True):
        prompt_length = example.target_mask.tolist().index(True)
        prompt = tokenizer.decode(example.input_ids[:prompt_length].tolist())
        assert row["context"] in prompt and row["instruction"] in prompt
        context_tokens = len(tokenizer(row["context"], add_special_tokens=False)["input_ids"])
        assert len(example.input_ids) >= len(blanked.input_ids) + context_tokens
        # the response is the same either way
        assert example.target_mask.sum() == blanked.target_mask.sum()


def test_the_old_mapping_names_the_context_it_leaves_out(tiny, tmp_path):
    """prompt_field: instruction alone (what the example said before) caches the instruction
    only: the note says so, naming the column and the option that maps it."""
    path = write_parquet(tmp_path / "dolly.parquet", dolly_rows(8))
    args = cache_args(
        tiny, tmp_path / "c", "--prompt-field", "instruction", "--response-field", "response",
        "--template", "chat", student=False,
    )  # fmt: skip
    args[args.index("--data") + 1] = str(path)
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    output = flat(result.output)
    assert "leaves out 'context' (map it with --context-field)" in output
    assert output.count("leaves out") == 1  # one note per source, not one per row


def test_the_dolly_example_cuts_500_test_rows_from_train():
    values = example_values()
    assert values["test_rows"] == 500 and "test" not in values
    assert (values["prompt_field"], values["context_field"]) == ("instruction", "context")


@pytest.mark.parametrize("validation_fraction", [0.2, 0.0])
def test_the_example_split_on_local_rows_is_disjoint_and_read_by_the_eval(
    tmp_path, validation_fraction
):
    rows = [{**row, "id": f"d{i}"} for i, row in enumerate(dolly_rows(40))]
    train = write_parquet(tmp_path / "dolly.parquet", rows)
    defaults = {f.name: f.default for f in option_fields(PipelineOptions)}
    values = {**example_values(), "train": str(train), "split": None, "test_rows": 6}
    values.update(out=str(tmp_path / "out"), validation_fraction=validation_fraction)
    options = PipelineOptions(
        **{**{k: v for k, v in defaults.items() if v is not REQUIRED}, **values}
    )
    held_out = heldout.hold_out(options)
    options = dataclasses.replace(options, held_out=held_out)
    ids = {
        name: [json.loads(line)["id"] for line in Path(path).read_text().splitlines()]
        for name, path in held_out.items()
    }
    assert len(ids["test"]) == 6
    assert len(ids.get("validation", [])) == round(validation_fraction * 34)
    parts = [set(part) for part in ids.values()]
    assert sum(map(len, parts)) == 40 and set().union(*parts) == {row["id"] for row in rows}
    record = json.loads((tmp_path / "out" / "data" / "split.json").read_text())
    assert record["test"]["ids"] == ids["test"] and record["test"]["seed"] == 0
    assert heldout.split_record(options)["test"] == record["test"]
    stages, _ = plan_stages(options)
    assert stages[-1].options.data == held_out["test"]
    for stage in stages[:-1]:  # every stage before the eval: never the test rows
        assert held_out["test"] not in json.dumps(vars(stage.options), default=str)
    assert any(getattr(stage.options, "data", None) == held_out["train"] for stage in stages)
