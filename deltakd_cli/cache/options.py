"""The options of `deltakd cache-teachers` and `deltakd inspect`, written once (options.py
derives the command line, the checks and the record from them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deltakd_cli.errors import DeltakdError
from deltakd_cli.method.rules import (
    DEFAULT_TAIL_SAMPLES,
    DEFAULT_TOP_K,
    SELECTION_RULES,
    TAIL_RULES,
    GridPoint,
    default_rules,
)
from deltakd_cli.option_groups import (
    DataOptions,
    DeviceOptions,
    DistributedOptions,
    ModelLoadOptions,
    TrainingTemplateOptions,
)
from deltakd_cli.options import NUMBER_LIST, opt

TEMPLATE_ROLES = ("tuned", "base", "student")


@dataclass(kw_only=True)
class CacheOptions(
    TrainingTemplateOptions, DataOptions, DeviceOptions, ModelLoadOptions, DistributedOptions
):
    """Run both teachers once over the data and store a sparse view of their distributions."""

    command: ClassVar[str] = "cache-teachers"

    teacher_base: str = opt(help="Base teacher: HF dir, hub id, or .gguf file.")
    teacher_tuned: str = opt(help="Tuned teacher (same tokenizer as the base).")
    data: str = opt(
        help="Rows: JSONL, JSON, parquet, CSV, a datasets directory or a Hub dataset name."
    )
    out: str = opt(help="Cache directory or fsspec URL (s3://...).")
    student: str | None = opt(
        None, help="Base student S0: store its log-probs and choose ids by the exact target."
    )
    top_k: int = opt(
        DEFAULT_TOP_K, help="Token ids kept exactly per response position (the head).", at_least=1
    )
    max_length: int | None = opt(
        None,
        help="Tokens per example, prompt + response (default 1024, or the models' limit).",
        at_least=2,
    )
    template_from: str = opt(
        "tuned",
        help="Whose tokenizer renders the prompt and ends the response (its chat template and "
        "EOS): tuned, base or student.",
        choices=TEMPLATE_ROLES,
    )
    batch_size: int = opt(8, help="Examples per forward pass (grouped by length).", at_least=1)
    device_map: str | None = opt(
        None, help="'auto' splits each teacher over this host's GPUs (single process)."
    )
    alpha: float = opt(1.0, help="Delta scale the student-aware selection targets.", finite=True)
    selection: str | None = opt(
        None,
        help="Kept ids: target (default with --student), tuned, tuned+base, tuned+student.",
        choices=SELECTION_RULES,
    )
    tail_rule: str | None = opt(
        None, help="mass-matched (default with --student) or teacher.", choices=TAIL_RULES
    )
    gammas: tuple[float, ...] | None = opt(
        None,
        help="KD-to-Delta grid: comma-separated gammas in [0, 1] (e.g. 0,0.5,1); with --alphas, "
        "the exact family tail is stored for every (gamma, alpha). Needs --student.",
        text=NUMBER_LIST,
        metavar="G1,G2,...",
    )
    alphas: tuple[float, ...] | None = opt(
        None,
        help="KD-to-Delta grid: comma-separated alphas (default with --gammas: --alpha).",
        text=NUMBER_LIST,
        metavar="A1,A2,...",
    )
    tail_samples: int | None = opt(
        None,
        help=f"Ids drawn per position, with replacement, from the tail outside the top-k (the "
        f"unbiased sampled tail; 0: one tail bucket instead; default {DEFAULT_TAIL_SAMPLES} when "
        "--top-k leaves a tail). Stored as distinct ids with their counts.",
        at_least=0,
    )
    sample_seed: int = opt(
        0,
        help="Seed of the tail draws (with the example and position, it fixes every draw).",
        at_least=0,
    )
    temperature: float = opt(
        1.0,
        help="Store (and draw from) softmax(logits / temperature); distill must use the same.",
        above=0,
        finite=True,
    )
    precision: str = opt(
        "float16", help="Stored log-prob dtype: float16 or float32.", choices=("float16", "float32")
    )
    overwrite: bool = opt(
        False, help="Replace a cache made with other settings (only what deltakd wrote)."
    )

    def resolved_selection(self) -> str:
        return self.selection or default_rules(bool(self.student), bool(self.grid()))[0]

    def resolved_tail_samples(self, vocab_size: int) -> int:
        """--tail-samples, or by default DEFAULT_TAIL_SAMPLES where the top-k leaves a tail."""
        if self.tail_samples is not None:
            return self.tail_samples
        return DEFAULT_TAIL_SAMPLES if self.top_k < vocab_size else 0

    def proposal(self) -> str | None:
        """The tail proposal of the draws (sampling.PROPOSALS), None without draws."""
        if not self.tail_samples:
            return None
        return "tuned+target" if self.student else "tuned"

    def resolved_tail_rule(self) -> str:
        return self.tail_rule or default_rules(bool(self.student), bool(self.grid()))[1]

    def grid(self) -> tuple[GridPoint, ...]:
        """The (gamma, alpha) grid points, gamma-major, in the order the cache stores them; ()
        when neither --gammas nor --alphas is given. A missing half defaults to gamma 1 (the
        Delta target) or to --alpha."""
        if self.gammas is None and self.alphas is None:
            return ()
        gammas = (1.0,) if self.gammas is None else tuple(map(float, self.gammas))
        alphas = (float(self.alpha),) if self.alphas is None else tuple(map(float, self.alphas))
        for gamma in gammas:
            if not 0.0 <= gamma <= 1.0:
                raise DeltakdError(f"--gammas: every gamma must be between 0 and 1, got {gamma:g}")
        return tuple((gamma, alpha) for gamma in gammas for alpha in alphas)


@dataclass(kw_only=True)
class InspectOptions:
    """Summarise a cache; verify its shards; print one example decoded."""

    command: ClassVar[str] = "inspect"

    cache: str = opt(help="Cache directory or URL.", argument=True, metavar="CACHE")
    verify: bool = opt(False, help="Check every shard against the manifest checksums.")
    json: bool = opt(False, help="Print JSON instead of a table.", flags=("--json",))
    example: int | None = opt(
        None, help="Print one example (by its row in the data): its tokens' text and, per target "
        "position, the kept ids as text with the tuned teacher's log-probs.", at_least=0,
    )  # fmt: skip
    positions: int | None = opt(
        None, help="With --example: the first N target positions (default: 8 in the table, all "
        "with --json).", at_least=1,
    )  # fmt: skip
