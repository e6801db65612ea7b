"""When two tokenizers are compatible: the cache stores log-probs per token id, so teachers,
base student and trained student must map every id the run uses to the same token string.

What does not make ids differ is accepted and said in one line: which token plays eos, bos, pad
or unk, the chat template, the length limit (a base checkpoint and its instruct sibling, as
Qwen2.5 and Qwen2.5-Instruct or Llama-3 and Llama-3-Instruct, differ exactly there). Tokens
appended after a shared prefix (some instruct checkpoints add a few) are accepted with a note:
the run works in the shared range, and the data must stay inside it. One id mapped to two
different strings is refused, naming the id and both strings."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from deltakd_cli.errors import DeltakdError

ROLES = ("bos", "eos", "pad", "unk")


def tokens_by_id(tokenizer: Any) -> list[str | None]:
    """The token string of every id the tokenizer can produce (added tokens included); None for
    an id no token has."""
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    tokens: list[str | None] = [None] * size
    for token, index in vocab.items():
        tokens[index] = token
    return tokens


def vocabulary_sha256(tokens: list[str | None]) -> str:
    payload = json.dumps(tokens, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def roles_of(tokenizer: Any) -> dict[str, Any]:
    """The special-token roles, chat template and length limit (recorded in provenance)."""
    template = getattr(tokenizer, "chat_template", None)
    roles: dict[str, Any] = {role: getattr(tokenizer, f"{role}_token", None) for role in ROLES}
    roles.update({f"{role}_id": getattr(tokenizer, f"{role}_token_id", None) for role in ROLES})
    roles["chat_template_sha256"] = (
        hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None
    )
    limit = getattr(tokenizer, "model_max_length", None)
    roles["model_max_length"] = limit if isinstance(limit, int) and limit < 10**12 else None
    return roles


@dataclass
class Compatibility:
    """The result of comparing tokenizers: the shared vocabulary size and what differs."""

    size: int  # ids 0..size-1 mean the same token for every tokenizer compared
    notes: list[str] = field(default_factory=list)  # one line each, accepted differences


def _role_differences(reference: Any, other: Any) -> list[str]:
    first, second = roles_of(reference), roles_of(other)
    differing = []
    for role in ROLES:
        if first[role] != second[role]:
            differing.append(f"{role} ({first[role]} vs {second[role]})")
    a, b = first["chat_template_sha256"], second["chat_template_sha256"]
    if a != b:
        which = "only the second has one" if a is None else "only the first has one"
        differing.append("chat template (" + (which if None in (a, b) else "different") + ")")
    if first["model_max_length"] != second["model_max_length"]:
        differing.append(
            f"model_max_length ({first['model_max_length']} vs {second['model_max_length']})"
        )
    return differing


def compare(tokenizers: dict[str, Any]) -> Compatibility:
    """Compare every tokenizer with the first; refuse an id that maps to two strings."""
    names = list(tokenizers)
    reference_name = names[0]
    reference = tokens_by_id(tokenizers[reference_name])
    size = len(reference)
    notes = []
    for name in names[1:]:
        other = tokens_by_id(tokenizers[name])
        shared = min(len(reference), len(other))
        for index in range(shared):
            if reference[index] != other[index]:
                raise DeltakdError(
                    f"tokenizer mismatch: id {index} is {reference[index]!r} for "
                    f"{reference_name} but {other[index]!r} for {name}; the models must share "
                    "their token ids"
                )
        if len(other) != len(reference):
            longer, extra = (
                (name, other) if len(other) > len(reference) else (reference_name, reference)
            )
            added = ", ".join(repr(t) for t in extra[shared : shared + 3])
            more = ", ..." if len(extra) - shared > 3 else ""
            notes.append(
                f"{longer} has {len(extra) - shared} token(s) after id {shared - 1} that the "
                f"other lacks ({added}{more}); ids up to {shared - 1} are shared and used"
            )
        size = min(size, shared)
        differing = _role_differences(tokenizers[reference_name], tokenizers[name])
        if differing:
            notes.append(
                f"{reference_name} and {name} share their token ids but differ in "
                + ", ".join(differing)
                + " (accepted: ids are what the cache stores)"
            )
    return Compatibility(size, notes)


def compare_with_tokens(
    tokens: list[str | None], tokenizer: Any, cache_name: str, name: str
) -> Compatibility:
    """Compare a tokenizer with a stored vocabulary (a cache's): the tokenizer must hold every
    stored id with the same string; more ids on its side are noted."""
    other = tokens_by_id(tokenizer)
    for index in range(min(len(tokens), len(other))):
        if tokens[index] != other[index]:
            raise DeltakdError(
                f"tokenizer mismatch: id {index} is {tokens[index]!r} in {cache_name} but "
                f"{other[index]!r} for {name}; the student must share the teachers' token ids"
            )
    if len(other) < len(tokens):
        raise DeltakdError(
            f"vocabulary mismatch: {cache_name} uses ids up to {len(tokens) - 1} but {name} has "
            f"only {len(other)} tokens"
        )
    notes = []
    if len(other) > len(tokens):
        notes.append(
            f"{name} has {len(other) - len(tokens)} token(s) after id {len(tokens) - 1} that "
            f"{cache_name} does not use (never a target; accepted)"
        )
    return Compatibility(len(tokens), notes)
