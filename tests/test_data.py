"""data.py: the row formats, the templates, the truncation rule, the target positions, the JSONL
reader and unlabelled text as rows, each against values written out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_one_line_error, cache_args, run_cli

from deltakd_cli import data, models, sources, vocab
from deltakd_cli.errors import DeltakdError


def test_every_row_format_becomes_one_example():
    rows = {
        "prompt": {"prompt": "p", "response": "r"},
        "dolly": {"instruction": "i", "context": "c", "response": "r"},
        "alpaca": {"instruction": "i", "input": "x", "output": "r"},
        "chat": {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "r"},
            ]
        },
        "evals": {"input": [{"role": "user", "content": "u"}], "ideal": ["r", "r2"]},
    }
    parsed = {name: data.parse_row(row, name, "0") for name, row in rows.items()}
    assert parsed["prompt"].raw_prompt == "p" and parsed["prompt"].response == "r"
    assert (parsed["dolly"].instruction, parsed["dolly"].input) == ("i", "c")
    assert (parsed["alpaca"].instruction, parsed["alpaca"].input) == ("i", "x")
    assert parsed["chat"].messages == rows["chat"]["messages"][:2]
    assert (parsed["chat"].instruction, parsed["chat"].input) == ("s", "u")
    assert parsed["evals"].references == ["r", "r2"] and parsed["evals"].instruction == "u"
    with pytest.raises(DeltakdError, match="unrecognised row"):
        data.parse_row({"question": "q"}, "x:1", "0")
    with pytest.raises(DeltakdError, match="x:1: the response is empty"):
        data.parse_row({"prompt": "p", "response": " "}, "x:1", "0")


def test_templates():
    example = data.Example("0", "Do it.", "With this.")
    alpaca = data.render_prompt(example, "alpaca")
    assert alpaca.endswith("### Instruction:\nDo it.\n\n### Input:\nWith this.\n\n### Response:\n")
    assert "paired with an input" in alpaca
    bare = data.render_prompt(data.Example("0", "Do it."), "alpaca")
    assert "### Input" not in bare and "paired with" not in bare
    assert data.render_prompt(example, "plain") == "Do it.\n\nWith this.\n\n"
    with pytest.raises(DeltakdError, match="needs a tokenizer with a chat template"):
        data.render_prompt(example, "chat")


@pytest.mark.parametrize(
    "prompt, response, max_length, kept_prompt, kept_response",
    [
        (5, 3, 10, 5, 3),  # fits: unchanged
        (5, 8, 10, 5, 5),  # the response is cut from its end; the prompt keeps min(5, 10 // 2)
        (12, 3, 10, 7, 3),  # the prompt gives up its start
        (12, 20, 10, 5, 5),  # both long: the prompt keeps half, the response the rest
        (3, 20, 10, 3, 7),  # a short prompt keeps all of itself
    ],
)
def test_the_truncation_rule(prompt, response, max_length, kept_prompt, kept_response):
    prompt_ids = list(range(100, 100 + prompt))
    response_ids = list(range(200, 200 + response))
    new_prompt, new_response = data.truncate(prompt_ids, response_ids, max_length)
    assert new_prompt == prompt_ids[prompt - kept_prompt :]  # the prompt's end survives
    assert new_response == response_ids[:kept_response]  # the response's start survives
    assert len(new_prompt) + len(new_response) <= max_length


def test_tokenising_keeps_the_response_boundary_and_adds_eos(tiny):
    tokenizer = models.load_tokenizer(str(tiny.student))
    example = data.Example("0", "the quick fox", raw_prompt="the quick fox", references=[" jumps"])
    tokenized = data.tokenize_example(example, "plain", tokenizer, 64)
    prompt_ids = tokenizer("the quick fox")["input_ids"]
    response_ids = tokenizer(" jumps", add_special_tokens=False)["input_ids"]
    assert tokenized.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert tokenized.prompt_length == len(prompt_ids) and not tokenized.truncated
    assert tokenized.target_mask == [False] * len(prompt_ids) + [True] * (len(response_ids) + 1)
    assert tokenized.num_targets == len(response_ids) + 1
    short = data.tokenize_example(example, "plain", tokenizer, 4)  # the rule, as above
    assert short.truncated and short.input_ids == prompt_ids[-2:] + response_ids[:2]
    assert short.prompt_length == 2 and short.num_targets == 2


def test_target_positions_predict_the_targets():
    # 6 tokens, the response starts at 4: the logits after tokens 0..3 and 0..4 predict 4 and 5
    assert data.target_positions([0, 0, 0, 0, 1, 1]).tolist() == [3, 4]
    # two assistant turns: tokens 2 and 5-6 are targets
    assert data.target_positions([0, 0, 1, 0, 0, 1, 1]).tolist() == [1, 4, 5]
    assert data.target_positions([0, 1]).dtype == np.int64


def test_the_jsonl_reader_names_the_file_and_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [(where.rsplit(":", 1)[1], value) for where, value in sources.read_jsonl(good)] == [
        ("1", {"a": 1}),
        ("3", {"a": 2}),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DeltakdError, match=r"bad.jsonl:2: not valid JSON"):
        list(sources.read_jsonl(bad))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"a": "\xe9"}\n')
    with pytest.raises(DeltakdError, match="not UTF-8"):
        list(sources.read_jsonl(latin))
    with pytest.raises(DeltakdError, match="predictions file not found"):
        list(sources.read_jsonl(tmp_path / "none.jsonl", "predictions file"))


def test_unlabelled_text_becomes_a_row():
    assert data.text_row("7", "one two three four") is None  # nothing left to predict
    row = data.text_row("7", "one two three four five six seven", max_words=6)
    assert row == {"id": "7", "prompt": "one two three four", "response": " five six"}
    assert json.dumps(row)  # plain data


def test_file_hash_is_the_sha256_of_the_bytes(tmp_path):
    import hashlib

    path = tmp_path / "f"
    path.write_bytes(b"x" * 3_000_000)
    assert sources.file_sha256(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_the_fixture_models_share_a_tokenizer(tiny):
    base = models.load_tokenizer(str(tiny.teacher_base))
    student = models.load_tokenizer(str(tiny.student))
    assert vocab.compare({"base": base, "student": student}).notes == []
    tokenized = data.tokenize_all(data.load_examples(tiny.train), "alpaca", base, 64)
    assert all(t.num_targets > 0 for t in tokenized)
    assert tokenized[0].input_ids[-1] == base.eos_token_id


def test_a_two_turn_conversation_has_targets_on_both_assistant_turns(tiny):
    tokenizer = models.load_tokenizer(str(tiny.student))
    row = {"messages": [
        {"role": "user", "content": "quick fox"},
        {"role": "assistant", "content": "brown dog"},
        {"role": "user", "content": "lazy river"},
        {"role": "assistant", "content": "night star"},
    ]}  # fmt: skip
    example = data.parse_row(row, "x:1", "0", train_turns="all")
    tokenized = data.tokenize_example(example, "chat", tokenizer, 256, "all")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id  # <|im_end|>: the template ends each turn with it
    expected = [
        (encode("<|im_start|>user\nquick fox<|im_end|>\n<|im_start|>assistant\n"), False),
        (encode("brown dog") + [eos], True),
        (encode("\n<|im_start|>user\nlazy river<|im_end|>\n<|im_start|>assistant\n"), False),
        (encode("night star") + [eos], True),
    ]
    assert tokenized.input_ids == [t for tokens, _ in expected for t in tokens]
    assert tokenized.target_mask == [flag for tokens, flag in expected for _ in tokens]
    targets = [
        t for t, flag in zip(tokenized.input_ids, tokenized.target_mask, strict=True) if flag
    ]
    assert tokenizer.decode(targets) == "brown dog<|im_end|>night star<|im_end|>"
    # --train-turns last: only the final turn, the rest is prompt
    last = data.tokenize_example(example, "chat", tokenizer, 256, "last")
    last_targets = [t for t, flag in zip(last.input_ids, last.target_mask, strict=True) if flag]
    assert tokenizer.decode(last_targets) == "night star<|im_end|>"
    assert last.input_ids == tokenized.input_ids  # the same text, fewer targets
    # a conversation that ends with the user: its earlier assistant turns are still targets
    open_row = {"messages": row["messages"][:3]}
    example = data.parse_row(open_row, "x:2", "1", train_turns="all")
    opened = data.tokenize_example(example, "chat", tokenizer, 256, "all")
    assert opened.num_targets == len(encode("brown dog")) + 1
    with pytest.raises(DeltakdError, match="x:2: the last turn is not the assistant's"):
        data.parse_row(open_row, "x:2", "1", train_turns="last")


def test_plain_text_rows_are_targets_on_every_token(tiny):
    tokenizer = models.load_tokenizer(str(tiny.student))
    example = data.parse_row({"text": "the quick brown fox"}, "x:1", "0", train_turns="all")
    tokenized = data.tokenize_example(example, "alpaca", tokenizer, 256)
    ids = tokenizer("the quick brown fox")["input_ids"] + [tokenizer.eos_token_id]
    assert tokenized.input_ids == ids
    assert tokenized.target_mask == [False] + [True] * (len(ids) - 1)
    cut = data.tokenize_example(example, "alpaca", tokenizer, 3)
    assert cut.input_ids == ids[:3] and cut.truncated
    with pytest.raises(DeltakdError, match="no reference to evaluate against"):
        data.parse_row({"text": "t"}, "x:1", "0")  # evaluation needs a reference


def test_a_context_column_maps_an_instruction_row():
    row = {"q": "i", "ctx": "c", "a": "r", "category": "x"}
    columns = data.Columns(prompt="q", response="a", context="ctx")
    example = data.parse_row(row, "x:1", "0", columns=columns)
    assert (example.instruction, example.input, example.response) == ("i", "c", "r")
    assert example.raw_prompt is None  # an instruction/input row, rendered as Dolly's is
    assert example == data.parse_row({"instruction": "i", "context": "c", "response": "r"}, "", "0")
    assert columns.left_out(row) == []  # `category` is no format's column
    with pytest.raises(DeltakdError, match="--context-field needs --prompt-field"):
        data.Columns(response="a", context="ctx").apply(row, "x:1")
    with pytest.raises(DeltakdError, match=r"no column 'context' \(--context-field\)"):
        data.Columns(prompt="q", response="a", context="context").apply(row, "x:1")


def test_a_mapping_names_the_format_columns_it_leaves_out(tmp_path, capsys):
    rows = [
        {"instruction": "i", "context": "c", "system": "s", "response": "r", "category": "x"},
        {"instruction": "i", "input": "c", "response": "r"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    columns = data.Columns(prompt="instruction", response="response")
    assert columns.left_out(rows[0]) == ["context", "system"]
    assert data.Columns().left_out(rows[0]) == []  # unmapped: read by its own names
    examples = data.load_examples(str(path), columns=columns)
    assert [e.input for e in examples] == ["", ""]  # left out, as the note says
    printed = capsys.readouterr()
    notes = [line for line in (printed.out + printed.err).splitlines() if "leaves out" in line]
    assert notes == [
        f"note: {path}: the column mapping leaves out 'context' (map it with --context-field), "
        "'input' (map it with --context-field), 'system'; they are not read"
    ]
    assert [e.input for e in data.load_examples(str(path))] == ["c", "c"]
    printed = capsys.readouterr()
    assert "leaves out" not in printed.out + printed.err  # unmapped rows lose nothing


RAISING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ raise_exception('this template takes no user turns') }}{% endif %}{% endfor %}"
)


def model_with_a_raising_template(tiny, tmp_path):
    """A copy of the student whose chat template raises (its own raise_exception)."""
    import shutil

    broken = tmp_path / "raising"
    shutil.copytree(tiny.student, broken)
    (broken / "chat_template.jinja").write_text(RAISING_TEMPLATE)
    return broken


def test_a_chat_template_that_raises_is_one_line_in_cache_teachers(tiny, tmp_path):
    broken = model_with_a_raising_template(tiny, tmp_path)
    args = cache_args(tiny, tmp_path / "cache", "--template", "chat", "--template-from",
                      "student", student=False) + ["--student", str(broken)]  # fmt: skip
    result = run_cli(args)
    assert_one_line_error(result, f"the chat template of {broken}",
                          str(broken / "chat_template.jinja"), "failed on example",
                          "this template takes no user turns")  # fmt: skip


def test_a_chat_template_that_raises_is_one_line_in_eval_template_from(tiny, tmp_path):
    broken = model_with_a_raising_template(tiny, tmp_path)
    result = run_cli(["eval", "--model", tiny.student, "--data", tiny.test, "--template", "chat",
                      "--template-from", broken, "--limit", 2, "--max-new-tokens", 2,
                      "--device", "cpu"])  # fmt: skip
    assert_one_line_error(
        result,
        f"the chat template of {broken}",
        str(broken / "chat_template.jinja"),
        "this template takes no user turns",
    )
