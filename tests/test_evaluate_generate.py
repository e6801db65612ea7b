"""evaluate/generate.py: batching, per-batch seeds, EOS handling, prompt truncation, on the tiny
teachers."""

from __future__ import annotations

import pytest
import torch
from helpers import greedy_protocol

from deltakd_cli import data, models
from deltakd_cli.evaluate import generate
from deltakd_cli.evaluate import protocol as protocols


def test_batching_helpers():
    lengths = [3, 9, 1, 9, 5, 2, 7]
    batches = generate.length_batches(lengths, 3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert batches[0] == [1, 3, 6]  # longest first, ties by row
    assert generate.batch_seed(10, 0) == generate.batch_seed(10, 0)
    assert len({generate.batch_seed(s, b) for s in (10, 20) for b in range(50)}) == 100
    assert generate.cut_at_eos([5, 6, 2, 7, 0], [2, 9]) == [5, 6]
    assert generate.cut_at_eos([5, 6], [2]) == [5, 6]
    ids, mask = generate.left_pad([[4, 5, 6], [7]], 0, torch.device("cpu"))
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.fixture(scope="module")
def teacher(tiny):
    """teacher_base answers differently for each prompt under the plain template, so rows
    mixed up by batching would show."""
    tokenizer = models.load_tokenizer(str(tiny.teacher_base))
    model = models.load_model(str(tiny.teacher_base))
    prompts = generate.prepare_prompts(data.load_examples(tiny.test), "plain", tokenizer, 256)
    return model, tokenizer, [p.ids for p in prompts]


def test_batched_greedy_equals_one_by_one(teacher):
    model, tokenizer, prompts = teacher
    batched = generate.generate_texts(
        model, tokenizer, prompts, greedy_protocol(batch_size=3), None
    )
    single = [
        generate.generate_texts(model, tokenizer, [p], greedy_protocol(batch_size=1), None)[0]
        for p in prompts
    ]
    assert batched == single
    assert len(set(batched)) > len(prompts) // 2  # the rows really differ


def test_model_generation_config_does_not_change_the_protocol(teacher):
    model, tokenizer, prompts = teacher
    plain = generate.generate_texts(model, tokenizer, prompts, greedy_protocol(), None)
    saved = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 50.0
    try:
        again = generate.generate_texts(model, tokenizer, prompts, greedy_protocol(), None)
    finally:
        model.generation_config.repetition_penalty = saved
    assert again == plain


def test_generation_stops_at_eos_per_row(teacher):
    model, tokenizer, prompts = teacher
    ids, mask = generate.left_pad(prompts[:1], tokenizer.pad_token_id, torch.device("cpu"))
    tokens = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8)[
        0, ids.shape[1] :
    ].tolist()
    stop = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = tokens[stop]  # pretend this token ends the answer
    try:
        texts = generate.generate_texts(model, tokenizer, prompts[:2], greedy_protocol(), None)
    finally:
        model.generation_config.eos_token_id = saved
    assert texts[0] == tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip()


def test_sampling_is_reproducible_under_a_seed(teacher):
    model, tokenizer, prompts = teacher
    protocol = protocols.make_protocol(
        "minillm", max_new_tokens=8, batch_size=4, template="plain", seeds="1,2"
    )
    torch.manual_seed(99)
    before = torch.rand(3)
    torch.manual_seed(99)
    first = generate.generate_texts(model, tokenizer, prompts, protocol, 1)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG state is untouched
    assert generate.generate_texts(model, tokenizer, prompts, protocol, 1) == first
    other = generate.generate_texts(model, tokenizer, prompts, protocol, 2)
    assert other != first


def test_prompts_are_cut_from_the_left(tiny):
    tokenizer = models.load_tokenizer(str(tiny.student))
    examples = data.load_examples(tiny.test)[:2]
    full = generate.prepare_prompts(examples, "alpaca", tokenizer, 10_000)
    cut = generate.prepare_prompts(examples, "alpaca", tokenizer, 5)
    for whole, short in zip(full, cut, strict=True):
        assert not whole.truncated and short.truncated
        assert short.ids == whole.ids[-5:] and short.text == whole.text
