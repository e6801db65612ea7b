"""Batched generation under a protocol: prompts rendered and cut from the left, batches of
similar length (dealt to ranks under torchrun), per-batch seeds so a batch's samples do not
depend on what ran before, responses cut at the first end-of-sequence token."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deltakd_cli.data import Example, encode_prompt, render_prompt
from deltakd_cli.errors import DeltakdError
from deltakd_cli.evaluate.protocol import Protocol


@dataclass
class PreparedPrompt:
    """A row's prompt: the rendered text, and the token ids the model sees (left-truncated)."""

    text: str
    ids: list[int]
    truncated: bool


def prepare_prompts(
    examples: Sequence[Example], template: str, tokenizer: Any, max_prompt_length: int
) -> list[PreparedPrompt]:
    """Render and tokenise every prompt; a prompt longer than `max_prompt_length` keeps its
    last `max_prompt_length` tokens (the end holds the instruction's tail and "### Response:")."""
    prepared = []
    for example in examples:
        text = render_prompt(example, template, tokenizer)
        ids = encode_prompt(example, template, tokenizer)
        if not ids:
            raise DeltakdError(f"example {example.id}: the prompt is empty after tokenisation")
        truncated = len(ids) > max_prompt_length
        prepared.append(PreparedPrompt(text, ids[-max_prompt_length:], truncated))
    return prepared


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length, longest first (so running out of
    memory shows at once). Depends only on the lengths and the batch size."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def batches_of_rank(
    lengths: Sequence[int], batch_size: int, shard: tuple[int, int] = (0, 1)
) -> list[tuple[int, list[int]]]:
    """(batch index, rows) of the batches one rank generates: `length_batches` dealt out in
    turn, batch i to rank i mod world, so every rank sees the one-process batches and seeds."""
    rank, world = shard
    return list(enumerate(length_batches(lengths, batch_size)))[rank::world]


def batch_seed(seed: int, batch_index: int) -> int:
    """The RNG seed of one batch: a hash of (run seed, batch index), so a batch's samples do not
    depend on how many random numbers earlier batches (or other models) used."""
    digest = hashlib.sha256(f"{seed}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a response: the generation config's (may be a list) and the
    tokenizer's EOS."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for candidate in (config_eos, tokenizer.eos_token_id):
        if candidate is None:
            continue
        for value in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
            if int(value) not in ids:
                ids.append(int(value))
    if not ids:
        raise DeltakdError(
            "the model has no EOS token (neither its generation config nor tokenizer)"
        )
    return ids


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, L] with the padding on the left, so every row's next
    token is generated at the same column."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def cut_at_eos(tokens: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """The tokens before the first EOS (generate pads finished rows after their EOS)."""
    stops = set(eos_ids)
    for position, token in enumerate(tokens):
        if token in stops:
            return list(tokens[:position])
    return list(tokens)


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    protocol: Protocol,
    seed: int | None,
    on_batch: Callable[[int], None] | None = None,
    shard: tuple[int, int] = (0, 1),
    stop_ids: Sequence[int] = (),
) -> list[str | None]:
    """Generate one response per prompt, in batches; returns decoded texts in prompt order
    (new tokens only, up to the first EOS, special tokens skipped, stripped). Sampling is
    reproducible under `seed`; the caller's RNG state is left as it was.

    `shard = (rank, world)` generates only this rank's batches (`batches_of_rank`) and leaves the
    other rows None: the ranks' texts together are exactly the one-process texts. `stop_ids`
    end a response too (the EOS of the template the prompts were rendered with)."""
    device = _model_device(model)
    eos_ids = eos_token_ids(model, tokenizer)
    eos_ids += [int(token) for token in stop_ids if int(token) not in eos_ids]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    if protocol.do_sample and seed is None:
        raise ValueError("sampling needs a seed")
    texts: list[str | None] = [None] * len(prompts)
    kwargs = protocol.generate_kwargs()
    rng_devices = [device] if device.type == "cuda" else []
    for batch_index, rows in batches_of_rank([len(p) for p in prompts], protocol.batch_size, shard):
        input_ids, attention_mask = left_pad([prompts[i] for i in rows], pad_id, device)
        with torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
            if protocol.do_sample:
                torch.manual_seed(batch_seed(seed, batch_index))
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pad_token_id=pad_id,
                eos_token_id=eos_ids,
                **kwargs,
            )
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        for row, tokens in zip(rows, new_tokens, strict=True):
            kept = cut_at_eos(tokens, eos_ids)
            texts[row] = tokenizer.decode(kept, skip_special_tokens=True).strip()
        if on_batch is not None:
            on_batch(len(rows))
    return texts


def merge_shards(shards: Sequence[Sequence[str | None]]) -> list[str]:
    """One text per row from the ranks' `generate_texts(shard=...)` lists (each row is
    generated by exactly one rank)."""
    merged = []
    for row, texts in enumerate(zip(*shards, strict=True)):
        made = [text for text in texts if text is not None]
        if len(made) != 1:
            raise RuntimeError(f"row {row} was generated by {len(made)} ranks, expected 1")
        merged.append(made[0])
    return merged
