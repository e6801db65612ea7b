"""vocab.py and its use by cache-teachers and distill: tokenizers are compatible when every id
the run uses maps to the same string. The real cases, on tiny tokenizers: a base/instruct pair
that differs only in eos/pad roles and a chat template (accepted, said and recorded; the cache
is the same bytes), a tokenizer with one token appended (accepted with a note), one with two
ids swapped (refused, naming the id); the same three for the student at distill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl
from helpers import assert_one_line_error, cache_args, flat, run_cli

from deltakd_cli import models, vocab
from deltakd_cli.cache.reader import CacheReader
from deltakd_cli.errors import DeltakdError

pytestmark = pytest.mark.usefixtures("one_thread")
SWAPPED = (40, 41)  # two ordinary byte-level tokens


def variant(source: Path, out: Path, kind: str) -> Path:
    """A copy of a model whose tokenizer is changed the way real checkpoints differ."""
    shutil.copytree(source, out)
    tokenizer = models.load_tokenizer(str(out))
    if kind == "base-like":  # as base checkpoints ship: no chat template, another eos
        tokenizer.chat_template = None
        tokenizer.eos_token = "<|endoftext|>"
        tokenizer.save_pretrained(out)
        (out / "chat_template.jinja").unlink(missing_ok=True)
    elif kind == "extra-token":  # an instruct checkpoint that appends a token
        tokenizer.add_tokens(["<|tool_call|>"], special_tokens=True)
        tokenizer.save_pretrained(out)
    elif kind == "swapped":  # two ids exchanged: the same strings, other ids
        spec = json.loads((out / "tokenizer.json").read_text())
        table = spec["model"]["vocab"]
        first, second = (next(t for t, i in table.items() if i == n) for n in SWAPPED)
        table[first], table[second] = table[second], table[first]
        (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    base_like = variant(tiny.teacher_base, root / "base-like", "base-like")
    reference = root / "same"
    result = run_cli(cache_args(tiny, reference, "--top-k", 8))
    assert result.exit_code == 0, result.output
    chat = root / "chat"
    result = run_cli(cache_args(tiny, chat, "--top-k", 8, "--template", "chat"))
    assert result.exit_code == 0, result.output
    return {"root": root, "base_like": base_like, "reference": reference, "chat": chat}


def arrays(cache: Path) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(str(next((cache / "shards").glob("*.zarr"))), mode="r")
    return {name: group[name][:] for name in group.array_keys()}


def test_a_base_instruct_pair_is_accepted_and_its_cache_is_the_same(tiny, world, tmp_path):
    out = tmp_path / "pair"
    args = cache_args(tiny, out, "--top-k", 8)
    args[args.index("--teacher-base") + 1] = world["base_like"]
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    said = flat(result.output)
    assert "share their token ids but differ in bos" not in said  # bos is the same token
    assert "differ in eos (<|im_end|> vs <|endoftext|>)" in said
    assert "chat template (only the first has one)" in said
    manifest = json.loads((out / "manifest.json").read_text())
    provenance = manifest["provenance"]
    assert provenance["teacher_base"]["tokenizer_roles"]["eos"] == "<|endoftext|>"
    assert provenance["teacher_tuned"]["tokenizer_roles"]["eos"] == "<|im_end|>"
    assert provenance["teacher_base"]["tokenizer_roles"]["chat_template_sha256"] is None
    assert provenance["template"]["from"] == "teacher_tuned"
    assert provenance["template"]["eos_token"] == "<|im_end|>"
    assert any("differ in eos" in note for note in provenance["tokenizer_notes"])
    expected, got = arrays(world["reference"]), arrays(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name


def test_an_appended_token_is_accepted_while_the_data_stays_in_the_shared_range(tiny, tmp_path):
    tuned = variant(tiny.teacher_tuned, tmp_path / "tuned-plus", "extra-token")
    args = cache_args(tiny, tmp_path / "c", "--top-k", 8)
    args[args.index("--teacher-tuned") + 1] = tuned
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert "has 1 token(s) after id 319" in flat(result.output)
    assert "'<|tool_call|>'" in flat(result.output)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["vocab_size"] == 320
    # a row whose text holds the appended token cannot be run by the base teacher
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "call <|tool_call|> now",
                                                  "response": "done"}])  # fmt: skip
    args = cache_args(tiny, tmp_path / "d", "--top-k", 8, "--data", data)
    args[args.index("--teacher-tuned") + 1] = tuned
    assert_one_line_error(run_cli(args), "token id 320 ('<|tool_call|>')", "not shared")


def test_swapped_ids_are_refused_naming_the_id(tiny, tmp_path):
    swapped = variant(tiny.teacher_tuned, tmp_path / "swapped", "swapped")
    tokens = vocab.tokens_by_id(models.load_tokenizer(str(tiny.teacher_base)))
    args = cache_args(tiny, tmp_path / "c", "--top-k", 8)
    args[args.index("--teacher-tuned") + 1] = swapped
    message = f"id 40 is {tokens[41]!r} for teacher_tuned but {tokens[40]!r} for teacher_base"
    assert_one_line_error(run_cli(args), "tokenizer mismatch", message)
    assert not (tmp_path / "c" / "manifest.json").exists()


@pytest.mark.parametrize("kind", ["base-like", "extra-token", "swapped"])
def test_the_student_side_at_distill(tiny, world, tmp_path, kind):
    student = variant(tiny.student, tmp_path / "student", kind)
    cache = world["chat"] if kind == "base-like" else world["reference"]
    args = ["distill", "--cache", cache, "--student", student, "--out",
            tmp_path / "out", "--max-steps", 1, "--batch-size", 4, "--num-workers", 0,
            "--device", "cpu"]  # fmt: skip
    result = run_cli(args)
    if kind == "swapped":
        assert_one_line_error(result, "tokenizer mismatch: id", "in the cache")
        return
    assert result.exit_code == 0, result.output
    said = flat(result.output)
    if kind == "extra-token":
        assert "has 1 token(s) after id 319 that the cache" in said
    else:
        assert "responses end with <|im_end|>" in said and "own EOS is <|endoftext|>" in said
        # the exported student stops where the cache's responses ended, with the chat template
        exported = models.load_tokenizer(str(tmp_path / "out"))
        assert exported.eos_token == "<|im_end|>" and exported.chat_template
        generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
        eos = generation["eos_token_id"]
        assert (eos if isinstance(eos, int) else eos[0]) == exported.eos_token_id


def test_compare_reports_roles_and_refuses_mismatches(tiny):
    tokenizer = models.load_tokenizer(str(tiny.teacher_base))
    assert vocab.compare({"a": tokenizer, "b": tokenizer}).notes == []
    tokens = vocab.tokens_by_id(tokenizer)
    assert vocab.compare_with_tokens(tokens, tokenizer, "cache", "student").size == len(tokens)
    with pytest.raises(DeltakdError, match="uses ids up to 320 but student has only 320 tokens"):
        vocab.compare_with_tokens(tokens + ["<more>"], tokenizer, "cache", "student")


def test_the_cache_keeps_its_vocabulary(world):
    reader = CacheReader(str(world["reference"]))
    tokens = reader.vocabulary()
    assert len(tokens) == reader.vocab_size and tokens[:3] == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    (world["reference"] / "vocabulary.json").write_text(json.dumps(tokens[::-1]))
    with pytest.raises(DeltakdError, match="does not match the manifest"):
        CacheReader(str(world["reference"])).vocabulary()
    (world["reference"] / "vocabulary.json").write_text(json.dumps(tokens))
