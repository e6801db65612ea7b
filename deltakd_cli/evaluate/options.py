"""The options of `deltakd eval`, written once (options.py derives the command line, the
checks and the record from them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deltakd_cli.evaluate.protocol import PROTOCOLS
from deltakd_cli.option_groups import (
    DataOptions,
    DeviceOptions,
    DistributedOptions,
    ModelLoadOptions,
    TemplateOptions,
)
from deltakd_cli.options import opt


@dataclass(kw_only=True)
class EvalOptions(
    TemplateOptions, DataOptions, DeviceOptions, ModelLoadOptions, DistributedOptions
):
    """Generate on a held-out set and score ROUGE-L the way the field reports it (data parallel
    under torchrun: each rank generates a share of the batches)."""

    command: ClassVar[str] = "eval"

    data: str = opt(
        help="Held-out rows with references: JSONL, JSON, parquet, CSV, a datasets directory or "
        "a Hub dataset name."
    )
    model: list[str] = opt(
        default_factory=list,
        flags=("--model",),
        help="Model to evaluate (HF dir, hub id, .gguf), or NAME=MODEL to show it as NAME; "
        "repeat for several.",
    )
    predictions: str | None = opt(
        None, help="Score this JSONL of generations ('prediction', 'id' or order) instead."
    )
    out: str | None = opt(
        None,
        help="Write REPORT.json and REPORT.generations.jsonl (default: print only).",
        local="output file",
    )
    protocol: str = opt(
        "minillm",
        help="minillm (sampling T=1, top_p 1, no top-k, 5 seeds) or greedy.",
        choices=PROTOCOLS,
    )
    seeds: str | None = opt(None, help="Sampling seeds, e.g. 10,20,30,40,50.")
    max_new_tokens: int | None = opt(None, help="Tokens generated per row (256).", at_least=1)
    max_prompt_length: int | None = opt(
        None, help="Prompt tokens kept, cut from the left (256).", at_least=1
    )
    batch_size: int = opt(8, help="Prompts per generate call (grouped by length).", at_least=1)
    template_from: str | None = opt(
        None,
        help="A model whose tokenizer renders every prompt and whose EOS stops every model "
        "(e.g. the instruct teacher, for a base model under --template chat).",
    )
    limit: int | None = opt(None, help="Evaluate the first N rows only.", at_least=1)
    baseline: str | None = opt(None, help="Model the others are compared to (default: the first).")
    group: list[str] = opt(
        default_factory=list,
        help="NAME=MODEL,MODEL...: score models together (e.g. one student's training seeds); "
        "repeatable.",
    )
    compare: list[str] = opt(
        default_factory=list,
        help="A:B, the paired difference A minus B of two groups (or models); repeatable.",
    )
    overwrite: bool = opt(False, help="Replace an existing REPORT.json.")
    json: bool = opt(
        False, help="Print the report as JSON on stdout (for scripts) instead of the tables.",
        flags=("--json",),
    )  # fmt: skip
