"""Rows into examples, prompt templates, and tokenisation with the target mask.

Supported row formats (from any source of sources.py: JSONL, JSON, parquet, CSV, datasets):
  - prompt/response:  {"prompt": ..., "response": ...}
  - Dolly:            {"instruction": ..., "context": ..., "response": ...}
  - Alpaca:           {"instruction": ..., "input": ..., "output": ...}
  - chat:             {"messages": [{"role": ..., "content": ...}, ...]}
                      (every assistant turn is a target with the chat template, or only the
                      last one: --train-turns; the last assistant turn is the reference)
  - evals registry:   {"input": [chat messages], "ideal": str | [str, ...]}
  - plain text:       {"text": ...} (training only: language-model loss on every token)
Other column names map onto these with `Columns` (--prompt-field, --context-field,
--response-field, --messages-field, --text-field); a format's column that a mapping leaves out is
named in a note. Any row may carry "id"; otherwise the 0-based row number is its
id. For evaluation, a row's references are its response, or all of `references`/`ideal` when
those hold a list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from deltakd_cli.console import info
from deltakd_cli.errors import DeltakdError
from deltakd_cli.option_groups import TEMPLATES, DataOptions
from deltakd_cli.sources import DataSource, read_rows

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


# Columns a supported row format reads (besides "id"): a column mapping that leaves one of these
# out is named in a note, never dropped without a word. `system` is no format's, but a dataset
# that has it means it as part of the prompt.
FORMAT_COLUMNS = (
    "prompt", "instruction", "context", "input", "system", "response", "output", "references",
    "ideal", "messages", "text",
)  # fmt: skip
# The option that maps a left-out column into its role, where one does.
COLUMN_OPTIONS = {
    "prompt": "--prompt-field", "instruction": "--prompt-field", "context": "--context-field",
    "input": "--context-field", "response": "--response-field", "output": "--response-field",
    "messages": "--messages-field", "text": "--text-field",
}  # fmt: skip


@dataclass(frozen=True)
class Columns:
    """Which columns hold each role of a row, when a dataset does not use the names of the
    supported formats: the prompt (the instruction, when a context column is mapped too), the
    context or input that goes with the instruction, the response, a chat conversation, or
    plain text. Once any is mapped, only the mapped columns are read."""

    prompt: str | None = None
    response: str | None = None
    messages: str | None = None
    text: str | None = None
    context: str | None = None

    @property
    def mapped(self) -> bool:
        return any((self.prompt, self.response, self.messages, self.text, self.context))

    def _roles(self) -> tuple[tuple[str, str, str | None], ...]:
        """(name in the mapped row, option, column) of every role. With a context column the
        row is an instruction/input row (Dolly, Alpaca), else a prompt/response row."""
        prompt_as = "instruction" if self.context else "prompt"
        return (
            (prompt_as, "prompt", self.prompt),
            ("input", "context", self.context),
            ("response", "response", self.response),
            ("messages", "messages", self.messages),
            ("text", "text", self.text),
        )

    def apply(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        """The row with the mapped columns under the names parse_row knows."""
        if not self.mapped:
            return row
        if self.context and not self.prompt:
            raise DeltakdError(
                "--context-field needs --prompt-field: the column holding the instruction"
            )
        mapped: dict[str, Any] = {"id": row["id"]} if "id" in row else {}
        for name, option, column in self._roles():
            if column is None:
                continue
            if column not in row:
                have = ", ".join(sorted(row)) or "none"
                raise DeltakdError(
                    f"{where}: no column '{column}' (--{option}-field); the columns are: {have}"
                )
            mapped[name] = row[column]
        return mapped

    def left_out(self, row: dict[str, Any]) -> list[str]:
        """The columns of `row` a supported format would read that the mapping does not (none
        when nothing is mapped: the row is read by its own names)."""
        if not self.mapped:
            return []
        used = {column for _, _, column in self._roles() if column is not None}
        return [name for name in FORMAT_COLUMNS if name in row and name not in used]


def left_out_note(spec: str, left_out: list[str]) -> str:
    """One line naming the columns a mapping leaves out, and the option that would map each."""
    named = [
        f"'{name}'" + (f" (map it with {COLUMN_OPTIONS[name]})" if name in COLUMN_OPTIONS else "")
        for name in left_out
    ]
    return (
        f"{spec}: the column mapping leaves out {', '.join(named)}; "
        f"{'it is' if len(named) == 1 else 'they are'} not read"
    )


def columns_of(options: DataOptions) -> Columns:
    """The column mapping a command's --*-field options give."""
    return Columns(
        options.prompt_field,
        options.response_field,
        options.messages_field,
        options.text_field,
        options.context_field,
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
    conversation: list[dict[str, str]] | None = None  # chat rows: every turn, assistant's included
    text: str | None = None  # plain-text rows: no prompt, every token is a target

    @property
    def response(self) -> str:
        return self.references[0] if self.references else ""


@dataclass
class TokenizedExample:
    """Token ids, and which of them are targets (predicted from the tokens before them): the
    response (EOS included) of a prompt/response row, every assistant turn of a conversation,
    every token but the first of plain text."""

    input_ids: list[int]
    target_mask: list[bool]
    truncated: bool = False

    @property
    def num_targets(self) -> int:
        """Positions that carry a target."""
        return len(target_positions(self.target_mask))

    @property
    def prompt_length(self) -> int:
        """Tokens before the first target (all of the prompt, for a single-turn row)."""
        return self.target_mask.index(True) if True in self.target_mask else len(self.input_ids)


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


def parse_row(
    row: Any,
    where: str,
    default_id: str,
    need_response: bool = True,
    columns: Columns | None = None,
    train_turns: str | None = None,
) -> Example:
    """One row in any supported format -> Example. `where` names the row in errors. With
    `train_turns` (training), a plain-text row is accepted, and with "all" a conversation needs
    an assistant turn anywhere rather than a final one."""
    if not isinstance(row, dict):
        raise DeltakdError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if columns is not None:
        row = columns.apply(row, where)
    row_id = str(row.get("id", default_id))
    if "text" in row and not any(key in row for key in ("messages", "prompt", "instruction")):
        if train_turns is None:
            raise DeltakdError(f"{where}: a plain-text row has no reference to evaluate against")
        text = _text(row["text"], where, "text")
        if not text.strip():
            raise DeltakdError(f"{where}: the text is empty")
        return Example(row_id, "", text=text)
    if "messages" in row:
        messages = _messages(row["messages"], where)
        if messages[-1]["role"] == "assistant":
            context, references = messages[:-1], [messages[-1]["content"]]
        else:
            context, references = messages, []
            if train_turns == "all" and any(m["role"] == "assistant" for m in messages):
                need_response = False  # its earlier assistant turns are the targets
            elif train_turns == "last":
                raise DeltakdError(
                    f"{where}: the last turn is not the assistant's (--train-turns last trains "
                    "the final assistant turn)"
                )
        if "references" in row:
            references = _references(row["references"], where, "references")
        instruction, extra = _chat_to_instruction(context)
        example = Example(
            row_id,
            instruction,
            extra,
            messages=context,
            references=references,
            conversation=messages,
        )
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
            "instruction/context/response, instruction/input/output, messages or text "
            "(or name the columns with --prompt-field/--response-field/--messages-field)"
        )
    if need_response:
        if not example.references:
            raise DeltakdError(f"{where}: the row has no response")
        if not example.response.strip():
            raise DeltakdError(f"{where}: the response is empty")
    return example


def load_examples(
    source: Any,
    need_response: bool = True,
    columns: Columns | None = None,
    train_turns: str | None = None,
) -> list[Example]:
    """Every row of a source (a path, or a sources.DataSource) as an Example; the first bad row
    raises one DeltakdError naming the file and row. `train_turns` as in parse_row."""
    if not isinstance(source, DataSource):
        source = DataSource(str(source))
    examples = []
    left_out: set[str] = set()
    for index, (where, row) in enumerate(read_rows(source)):
        if columns is not None and isinstance(row, dict):
            left_out.update(columns.left_out(row))
        examples.append(parse_row(row, where, str(index), need_response, columns, train_turns))
    if not examples:
        raise DeltakdError(f"{source.spec}: no examples (the file is empty)")
    if left_out:
        named = [name for name in FORMAT_COLUMNS if name in left_out]
        info(f"[yellow]note:[/yellow] {escape(left_out_note(source.spec, named))}")
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


def target_positions(target_mask: Any) -> np.ndarray:
    """The positions that carry a target: the logits after reading tokens[..p] predict token
    p + 1, so position p carries a target when token p + 1 is one. A single-turn example whose
    response starts at P has them at P-1 .. L-2 (one per response token, EOS included)."""
    mask = np.asarray(target_mask, dtype=bool)
    return np.flatnonzero(mask[1:]).astype(np.int64)


def template_source(tokenizer: Any) -> str:
    """Where a tokenizer's chat template was read: its chat_template.jinja, or its
    tokenizer_config.json."""
    root = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        if (root / name).is_file():
            return str(root / name)
    return f"{root}/tokenizer_config.json"


def apply_chat_template(tokenizer: Any, messages: list[dict], example: Example, **kwargs) -> str:
    """The tokenizer's chat template over `messages`, as text; a template that fails (its own
    raise_exception, a syntax error, a missing variable) is one line naming the model, the
    template's file, the example and the template's message."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except jinja2.TemplateError as error:
        where = f" (line {error.lineno})" if getattr(error, "lineno", None) else ""
        raise DeltakdError(
            f"the chat template of {tokenizer.name_or_path} ({template_source(tokenizer)}"
            f"{where}) failed on example {example.id}: {error.message or type(error).__name__}"
        ) from None


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
        return apply_chat_template(tokenizer, messages, example, add_generation_prompt=True)
    raise DeltakdError(f"unknown template '{template}' (choose from {', '.join(TEMPLATES)})")


def encode_prompt(example: Example, template: str, tokenizer: Any) -> list[int]:
    """Prompt token ids. The chat template writes its own special tokens; the others get the
    tokenizer's usual ones (e.g. BOS)."""
    text = render_prompt(example, template, tokenizer)
    add_special = template != "chat"
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def _eos(tokenizer: Any) -> list[int]:
    return [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_segments(
    example: Example, tokenizer: Any, train_turns: str
) -> list[tuple[list[int], bool]]:
    """A conversation as (token ids, is target) segments under the tokenizer's chat template:
    the text before each trained assistant turn (system, user and untrained turns; never a
    target), then the turn's content and EOS (a target). Each piece is the difference between
    renderings of the conversation cut before and after the turn, so the template's own markers
    land where it writes them; nothing after the last trained turn is kept."""
    messages = example.conversation or []
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = assistant_turns if train_turns == "all" else assistant_turns[-1:]
    if not trained:
        raise DeltakdError(f"example {example.id}: no assistant turn to train on")
    segments: list[tuple[list[int], bool]] = []
    consumed = ""  # the rendered text the segments so far stand for
    eos_text = tokenizer.eos_token or ""
    for turn in trained:
        prefix = apply_chat_template(
            tokenizer, messages[:turn], example, add_generation_prompt=True
        )
        if not prefix.startswith(consumed):
            raise DeltakdError(
                f"example {example.id}: the chat template renders the turns before assistant "
                f"turn {turn} differently once later turns exist; use --train-turns last"
            )
        segments.append((_encode(tokenizer, prefix[len(consumed) :]), False))
        full = apply_chat_template(
            tokenizer, messages[: turn + 1], example, add_generation_prompt=False
        )
        content = messages[turn]["content"]
        if eos_text and full.startswith(prefix + content + eos_text):
            segments.append((_encode(tokenizer, content) + _eos(tokenizer), True))
            consumed = prefix + content + eos_text
        else:  # the template ends a turn with its own marker: that text is the target's end
            segments.append((_encode(tokenizer, full[len(prefix) :]), True))
            consumed = full
    return segments


def truncate(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list, list]:
    """The truncation rule of a single-turn row. When prompt + response exceed `max_length`, the
    prompt keeps at least min(len(prompt), max_length // 2) tokens, the response fills what is
    left (cut from its end, so it may lose its EOS), and the prompt gives up tokens from its
    start as far as needed. (Conversations and plain text are cut from their end instead.)"""
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids
    prompt_floor = min(len(prompt_ids), max_length // 2)
    response_ids = response_ids[: max_length - prompt_floor]
    prompt_budget = max_length - len(response_ids)
    return prompt_ids[len(prompt_ids) - prompt_budget :], response_ids


def _from_segments(
    example: Example, segments: list[tuple[list[int], bool]], max_length: int
) -> TokenizedExample:
    """Concatenated segments, cut from the end to `max_length` tokens."""
    ids = [token for tokens, _ in segments for token in tokens]
    mask = [is_target for tokens, is_target in segments for _ in tokens]
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    if mask:
        mask[0] = False  # nothing predicts the first token
    if not any(mask):
        raise DeltakdError(
            f"example {example.id}: no target token is left within --max-length {max_length}"
        )
    return TokenizedExample(ids, mask, truncated)


def tokenize_example(
    example: Example, template: str, tokenizer: Any, max_length: int, train_turns: str = "all"
) -> TokenizedExample:
    """Token ids and target mask of one example. A single-turn row is prompt + response + EOS,
    tokenised separately so the response boundary is exact; a conversation with several
    assistant turns under the chat template follows `chat_segments`; plain text is every
    token (BOS as the tokenizer adds it, EOS appended) with every token but the first a
    target."""
    if example.text is not None:
        ids = list(tokenizer(example.text)["input_ids"]) + _eos(tokenizer)
        return _from_segments(example, [(ids[:1], False), (ids[1:], True)], max_length)
    conversation = example.conversation or []
    assistant_turns = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    single_turn = assistant_turns == [len(conversation) - 1] or train_turns == "last"
    if template == "chat" and conversation and not (single_turn and example.references):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DeltakdError("--template chat needs a tokenizer with a chat template")
        return _from_segments(example, chat_segments(example, tokenizer, train_turns), max_length)
    prompt_ids = encode_prompt(example, template, tokenizer)
    response_ids = _encode(tokenizer, example.response) + _eos(tokenizer)
    kept_prompt, kept_response = truncate(prompt_ids, response_ids, max_length)
    truncated = len(kept_prompt) + len(kept_response) < len(prompt_ids) + len(response_ids)
    if not kept_prompt:
        # A target at position p predicts token p+1, so at least one prompt token must remain.
        raise DeltakdError(f"example {example.id}: the prompt is empty after tokenisation")
    mask = [False] * len(kept_prompt) + [True] * len(kept_response)
    return TokenizedExample(kept_prompt + kept_response, mask, truncated)


def tokenize_all(
    examples: list[Example],
    template: str,
    tokenizer: Any,
    max_length: int,
    train_turns: str = "all",
) -> list[TokenizedExample]:
    if max_length < 2:
        raise DeltakdError(f"--max-length must be at least 2, got {max_length}")
    return [tokenize_example(e, template, tokenizer, max_length, train_turns) for e in examples]
