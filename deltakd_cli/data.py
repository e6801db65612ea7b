"""Reading JSONL rows into examples, prompt templates, and tokenisation with the response mask.

Supported row formats (one JSON object per line):
  - prompt/response:  {"prompt": ..., "response": ...}
  - Dolly:            {"instruction": ..., "context": ..., "response": ...}
  - Alpaca:           {"instruction": ..., "input": ..., "output": ...}
  - chat:             {"messages": [{"role": ..., "content": ...}, ...]}
                      (the last assistant turn is the response)
  - evals registry:   {"input": [chat messages], "ideal": str | [str, ...]}
Any row may carry "id"; otherwise the 0-based row number is its id. For evaluation, a row's
references are its response, or all of `references`/`ideal` when those hold a list.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deltakd_cli.errors import DeltakdError

TEMPLATES = ("alpaca", "chat", "plain")
HEAL_PROMPT_WORDS = 4  # unlabelled text: the first words are the prompt, the rest the response

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class Example:
    """One row: what the model is asked, and the reference answer(s)."""

    id: str
    instruction: str
    input: str = ""
    messages: list[dict[str, str]] | None = None  # the conversation before the response (chat rows)
    raw_prompt: str | None = None  # prompt/response rows: the prompt as written
    references: list[str] = field(default_factory=list)  # first one is the training response

    @property
    def response(self) -> str:
        return self.references[0] if self.references else ""


@dataclass
class TokenizedExample:
    """Token ids of prompt + response (+ EOS); tokens from `prompt_length` on are the response."""

    input_ids: list[int]
    prompt_length: int
    truncated: bool = False

    @property
    def num_targets(self) -> int:
        """Response tokens (EOS included) = positions that carry a target."""
        return len(target_positions(self.prompt_length, len(self.input_ids)))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DeltakdError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DeltakdError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for turn in value:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DeltakdError(f"{where}: every message needs 'role' and 'content'")
        _text(turn["content"], where, "content")
    return [{"role": str(t["role"]), "content": t["content"]} for t in value]


def _references(value: Any, where: str, name: str) -> list[str]:
    if isinstance(value, list):
        if not value:
            raise DeltakdError(f"{where}: '{name}' is an empty list")
        return [_text(v, where, name) for v in value]
    return [_text(value, where, name)]


def _chat_to_instruction(messages: list[dict[str, str]]) -> tuple[str, str]:
    """Map a conversation onto Alpaca's instruction/input: system text is the instruction and
    the user turns the input; with no system turn, the last user turn is the instruction."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    users = [m["content"] for m in messages if m["role"] == "user"]
    if system:
        return system, "\n\n".join(users)
    if users:
        return users[-1], "\n\n".join(users[:-1])
    return "\n\n".join(m["content"] for m in messages), ""


def parse_row(row: Any, where: str, default_id: str, need_response: bool = True) -> Example:
    """One JSON object in any supported format -> Example. `where` names the line in errors."""
    if not isinstance(row, dict):
        raise DeltakdError(f"{where}: expected a JSON object, got {type(row).__name__}")
    row_id = str(row.get("id", default_id))
    if "messages" in row:
        messages = _messages(row["messages"], where)
        if messages[-1]["role"] == "assistant":
            context, references = messages[:-1], [messages[-1]["content"]]
        else:
            context, references = messages, []
        if "references" in row:
            references = _references(row["references"], where, "references")
        instruction, extra = _chat_to_instruction(context)
        example = Example(row_id, instruction, extra, messages=context, references=references)
    elif "input" in row and isinstance(row["input"], list):  # evals registry rows
        context = _messages(row["input"], where)
        instruction, extra = _chat_to_instruction(context)
        references = _references(row["ideal"], where, "ideal") if "ideal" in row else []
        example = Example(row_id, instruction, extra, messages=context, references=references)
    elif "instruction" in row:
        instruction = _text(row["instruction"], where, "instruction")
        extra = _text(row.get("input", row.get("context", "")) or "", where, "input")
        if "output" in row:
            references = _references(row["output"], where, "output")
        elif "response" in row:
            references = _references(row["response"], where, "response")
        else:
            references = []
        if "references" in row:
            references = _references(row["references"], where, "references")
        example = Example(row_id, instruction, extra, references=references)
    elif "prompt" in row:
        prompt = _text(row["prompt"], where, "prompt")
        references = (
            _references(row["response"], where, "response")
            if "response" in row
            else _references(row["references"], where, "references")
            if "references" in row
            else []
        )
        example = Example(row_id, prompt, "", raw_prompt=prompt, references=references)
    else:
        keys = ", ".join(sorted(row)) or "none"
        raise DeltakdError(
            f"{where}: unrecognised row (keys: {keys}); expected prompt/response, "
            "instruction/context/response, instruction/input/output, or messages"
        )
    if need_response:
        if not example.references:
            raise DeltakdError(f"{where}: the row has no response")
        if not example.response.strip():
            raise DeltakdError(f"{where}: the response is empty")
    return example


def read_jsonl(path: str | Path, what: str = "data file") -> Iterator[tuple[str, Any]]:
    """(where, value) for every non-blank line of a JSONL file, `where` being PATH:LINE. A
    missing or unreadable file, a line that is not JSON or text that is not UTF-8 raises one
    DeltakdError naming the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise DeltakdError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DeltakdError(f"{where}: not valid JSON ({error.msg})") from None
                yield where, value
    except UnicodeDecodeError:
        raise DeltakdError(f"{path}: not UTF-8 text") from None
    except OSError as error:
        raise DeltakdError(f"cannot read {what} {path}: {error.strerror}") from None


def load_examples(path: str | Path, need_response: bool = True) -> list[Example]:
    """Read a JSONL file; the first bad line raises one DeltakdError naming the file and line."""
    examples = [
        parse_row(row, where, str(index), need_response)
        for index, (where, row) in enumerate(read_jsonl(path))
    ]
    if not examples:
        raise DeltakdError(f"{path}: no examples (the file is empty)")
    return examples


def text_row(identifier: str, text: str, max_words: int | None = None) -> dict[str, Any] | None:
    """Unlabelled text as a prompt/response row (healing data): the first HEAL_PROMPT_WORDS words
    are the prompt, the rest (up to `max_words` words in all) carries the targets. None when the
    text is too short to have a response."""
    words = text.split()
    if max_words is not None:
        words = words[:max_words]
    if len(words) <= HEAL_PROMPT_WORDS:
        return None
    return {
        "id": identifier,
        "prompt": " ".join(words[:HEAL_PROMPT_WORDS]),
        "response": " " + " ".join(words[HEAL_PROMPT_WORDS:]),
    }


def target_positions(prompt_length: int, num_tokens: int) -> np.ndarray:
    """The positions that carry a target: the logits after reading tokens[..p] predict token
    p + 1, so an example of `num_tokens` tokens whose response starts at `prompt_length` has
    its targets at prompt_length - 1 .. num_tokens - 2 (one per response token, EOS included)."""
    return np.arange(prompt_length - 1, num_tokens - 1, dtype=np.int64)


def render_prompt(example: Example, template: str, tokenizer: Any = None) -> str:
    """The prompt text under a template (`alpaca`, `chat`, `plain`)."""
    if template == "alpaca":
        if example.input:
            return ALPACA_WITH_INPUT.format(instruction=example.instruction, input=example.input)
        return ALPACA_NO_INPUT.format(instruction=example.instruction)
    if template == "plain":
        if example.raw_prompt is not None:
            return example.raw_prompt
        return example.instruction + (f"\n\n{example.input}" if example.input else "") + "\n\n"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DeltakdError("--template chat needs a tokenizer with a chat template")
        messages = example.messages
        if messages is None:
            content = example.instruction + (f"\n\n{example.input}" if example.input else "")
            messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise DeltakdError(f"unknown template '{template}' (choose from {', '.join(TEMPLATES)})")


def encode_prompt(example: Example, template: str, tokenizer: Any) -> list[int]:
    """Prompt token ids. The chat template writes its own special tokens; the others get the
    tokenizer's usual ones (e.g. BOS)."""
    text = render_prompt(example, template, tokenizer)
    add_special = template != "chat"
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def truncate(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list, list]:
    """The truncation rule. When prompt + response exceed `max_length`, the prompt keeps at least
    min(len(prompt), max_length // 2) tokens, the response fills what is left (cut from its end,
    so it may lose its EOS), and the prompt gives up tokens from its start as far as needed."""
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids
    prompt_floor = min(len(prompt_ids), max_length // 2)
    response_ids = response_ids[: max_length - prompt_floor]
    prompt_budget = max_length - len(response_ids)
    return prompt_ids[len(prompt_ids) - prompt_budget :], response_ids


def tokenize_example(
    example: Example, template: str, tokenizer: Any, max_length: int
) -> TokenizedExample:
    """Prompt + response + EOS as ids; prompt and response are tokenised separately so the
    response boundary is exact."""
    prompt_ids = encode_prompt(example, template, tokenizer)
    response_ids = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        response_ids.append(int(tokenizer.eos_token_id))
    kept_prompt, kept_response = truncate(prompt_ids, response_ids, max_length)
    truncated = len(kept_prompt) + len(kept_response) < len(prompt_ids) + len(response_ids)
    if not kept_prompt:
        # A target at position p predicts token p+1, so at least one prompt token must remain.
        raise DeltakdError(f"example {example.id}: the prompt is empty after tokenisation")
    return TokenizedExample(kept_prompt + kept_response, len(kept_prompt), truncated)


def tokenize_all(
    examples: list[Example], template: str, tokenizer: Any, max_length: int
) -> list[TokenizedExample]:
    if max_length < 2:
        raise DeltakdError(f"--max-length must be at least 2, got {max_length}")
    return [tokenize_example(e, template, tokenizer, max_length) for e in examples]
