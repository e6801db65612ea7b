"""How text is generated for evaluation: the field's protocol (MiniLLM/DistiLLM: sampling at
temperature 1, top_p 1, no top-k, five seeds, 256 prompt and 256 new tokens) or greedy
decoding, with the user's overrides checked. See docs/evaluation.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deltakd_cli.errors import DeltakdError
from deltakd_cli.option_groups import TEMPLATES

PROTOCOLS = ("minillm", "greedy")
DEFAULT_SEEDS = (10, 20, 30, 40, 50)
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_MAX_PROMPT_LENGTH = 256
DEFAULT_BATCH_SIZE = 8

# Decoding knobs a model's own generation_config may set (some instruct models ship
# repetition_penalty 1.05, top_k 20, min_p ...). They are reset so that the protocol, not the
# checkpoint, decides how text is sampled.
_NEUTRAL_GENERATION = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "min_p": None,
    "top_h": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_length": 0,
    "min_new_tokens": None,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "stop_strings": None,
    "penalty_alpha": None,
    "dola_layers": None,
    "prompt_lookup_num_tokens": None,
    "guidance_scale": None,
    "watermarking_config": None,
    "use_cache": True,
}


@dataclass(frozen=True)
class Protocol:
    """How text is generated. `seeds` is `(None,)` for deterministic (greedy) decoding."""

    name: str
    do_sample: bool
    temperature: float | None
    top_p: float | None
    top_k: int | None  # 0 = no top-k filtering
    seeds: tuple[int | None, ...]
    max_new_tokens: int
    max_prompt_length: int
    batch_size: int
    template: str

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate` (without ids, pad and eos)."""
        kwargs = dict(_NEUTRAL_GENERATION)
        kwargs.update(
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
        )
        return kwargs

    @property
    def is_published(self) -> bool:
        """True when these are exactly the MiniLLM/DistiLLM evaluation settings."""
        return (
            self.name == "minillm"
            and self.template == "alpaca"
            and self.seeds == DEFAULT_SEEDS
            and self.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
            and self.max_prompt_length == DEFAULT_MAX_PROMPT_LENGTH
        )

    def to_report(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seeds": [s for s in self.seeds if s is not None],
            "max_new_tokens": self.max_new_tokens,
            "max_prompt_length": self.max_prompt_length,
            "prompt_truncation": "left (the start of a long prompt is cut)",
            "batch_size": self.batch_size,
            "template": self.template,
            "seeding": (
                "torch.manual_seed(sha256('<seed>:<batch index>')) before each batch; "
                "batches are prompts sorted by token length"
                if self.do_sample
                else None
            ),
            "matches_published_protocol": self.is_published,
        }


def parse_seeds(text: str, option: str = "--seeds") -> tuple[int, ...]:
    """'10,20,30' -> (10, 20, 30); non-negative, distinct integers. Errors name `option`."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise DeltakdError(
            f"{option}: expected comma-separated integers like 10,20,30, got '{text}'"
        )
    seeds = []
    for part in parts:
        try:
            seed = int(part)
        except ValueError:
            raise DeltakdError(f"{option}: '{part}' is not an integer (in '{text}')") from None
        if seed < 0:
            raise DeltakdError(f"{option}: seeds must be non-negative, got {seed}")
        seeds.append(seed)
    if len(set(seeds)) != len(seeds):
        raise DeltakdError(f"{option}: a seed is repeated in '{text}'")
    return tuple(seeds)


def _positive(value: int | None, option: str) -> None:
    if value is not None and value <= 0:
        raise DeltakdError(f"{option} must be a positive integer, got {value}")


def make_protocol(
    name: str = "minillm",
    *,
    seeds: str | None = None,
    max_new_tokens: int | None = None,
    max_prompt_length: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    template: str = "alpaca",
) -> Protocol:
    """The named preset with the user's overrides, validated."""
    if name not in PROTOCOLS:
        raise DeltakdError(f"unknown protocol '{name}' (choose from {', '.join(PROTOCOLS)})")
    if template not in TEMPLATES:
        raise DeltakdError(f"unknown template '{template}' (choose from {', '.join(TEMPLATES)})")
    _positive(max_new_tokens, "--max-new-tokens")
    _positive(max_prompt_length, "--max-prompt-length")
    _positive(batch_size, "--batch-size")
    common = {
        "name": name,
        "max_new_tokens": max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        "max_prompt_length": max_prompt_length or DEFAULT_MAX_PROMPT_LENGTH,
        "batch_size": batch_size,
        "template": template,
    }
    if name == "greedy":
        if seeds is not None:
            raise DeltakdError("--seeds needs sampling (--protocol minillm); greedy is one run")
        return Protocol(
            do_sample=False, temperature=None, top_p=None, top_k=None, seeds=(None,), **common
        )
    parsed = DEFAULT_SEEDS if seeds is None else parse_seeds(seeds)
    return Protocol(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, seeds=parsed, **common)
