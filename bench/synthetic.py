"""Models and rows made here, for the benches that need a shape rather than a trained model: a
word-level tokenizer of any vocabulary size, a randomly initialised model from a configuration,
and rows of chosen token lengths. Nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

SPECIAL = ("<unk>", "<eos>", "<pad>")


def word_tokenizer(directory: Path, vocab_size: int):
    """A tokenizer of exactly `vocab_size` tokens: the specials, then the words w0, w1, ...
    (one token per whitespace-separated word, so a row's length in tokens is its word count)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{index}" for index in range(vocab_size - len(SPECIAL))]
    vocabulary = {token: index for index, token in enumerate([*SPECIAL, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<eos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return fast


def random_model(directory: Path, config, tokenizer, seed: int = 0) -> Path:
    """A randomly initialised causal LM of `config` with `tokenizer`, saved as an HF directory
    (kept when already there: the benches reuse it)."""
    from transformers import AutoModelForCausalLM

    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(seed)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def perturbed(source: Path, target: Path, scale: float = 0.05, seed: int = 1) -> Path:
    """A stand-in tuned teacher: the same weights with a small relative random shift."""
    from common import perturbed_model

    return perturbed_model(source, target, scale, seed)


def rows(
    path: Path, count: int, prompt_tokens: int, response_tokens: int, vocab_size: int, seed=0
) -> Path:
    """`count` prompt/response rows of exactly these word counts (the `plain` template adds
    nothing, the response gets the EOS): a long response is a long run of target positions."""
    rng = random.Random(seed)
    words = vocab_size - len(SPECIAL)

    def text(length: int) -> str:
        return " ".join(f"w{rng.randrange(words)}" for _ in range(length))

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for index in range(count):
            row = {"id": f"row-{index}", "prompt": text(prompt_tokens),
                   "response": text(response_tokens)}  # fmt: skip
            handle.write(json.dumps(row) + "\n")
    return path
