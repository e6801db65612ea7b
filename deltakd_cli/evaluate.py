"""The evaluation stage: batched generation under a protocol, scoring, mean/std over seeds, the
paired bootstrap between models, and the report files. See docs/evaluation.md."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltakd_cli import __version__, outputs, rouge
from deltakd_cli.data import TEMPLATES, Example, encode_prompt, file_sha256, load_examples
from deltakd_cli.data import render_prompt as _render_prompt
from deltakd_cli.errors import DeltakdError
from deltakd_cli.outputs import local_path

PROTOCOLS = ("minillm", "greedy")
DEFAULT_SEEDS = (10, 20, 30, 40, 50)
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_MAX_PROMPT_LENGTH = 256
DEFAULT_BATCH_SIZE = 8
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
BOOTSTRAP_CONFIDENCE = 0.95

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


# --------------------------------------------------------------------------- protocol


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


# --------------------------------------------------------------------------- generation


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
        text = _render_prompt(example, template, tokenizer)
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


def rank_batches(
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
) -> list[str | None]:
    """Generate one response per prompt, in batches; returns decoded texts in prompt order
    (new tokens only, up to the first EOS, special tokens skipped, stripped). Sampling is
    reproducible under `seed`; the caller's RNG state is left as it was.

    `shard = (rank, world)` generates only this rank's batches (`rank_batches`) and leaves the
    other rows None: the ranks' texts together are exactly the one-process texts."""
    device = _model_device(model)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    if protocol.do_sample and seed is None:
        raise ValueError("sampling needs a seed")
    texts: list[str | None] = [None] * len(prompts)
    kwargs = protocol.generate_kwargs()
    rng_devices = [device] if device.type == "cuda" else []
    for batch_index, rows in rank_batches([len(p) for p in prompts], protocol.batch_size, shard):
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


# --------------------------------------------------------------------------- statistics


def paired_bootstrap(
    a_scores: Sequence[float],
    b_scores: Sequence[float],
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = BOOTSTRAP_CONFIDENCE,
) -> dict[str, float]:
    """Mean of b - a over paired rows, with a percentile bootstrap interval: rows are resampled
    with replacement (the same rows for both, so what the models share cancels), the mean
    difference is taken per resample, and the interval is its (1-c)/2 and (1+c)/2 quantiles.
    Reproducible under `seed`."""
    a = np.asarray(a_scores, dtype=np.float64)
    b = np.asarray(b_scores, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(
            f"paired scores must be two 1-D arrays of one length: {a.shape}, {b.shape}"
        )
    if a.size == 0:
        raise ValueError("paired_bootstrap needs at least one row")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired_bootstrap got non-finite scores")
    if n_resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError("n_resamples must be >= 1 and confidence in (0, 1)")
    differences = b - a
    rows = differences.size
    rng = np.random.default_rng(seed)
    resampled_means = np.empty(n_resamples)
    chunk = max(1, (1 << 22) // rows)  # bounded memory; depends only on `rows`, so reproducible
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        picks = rng.integers(0, rows, size=(size, rows))
        resampled_means[start : start + size] = differences[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled_means, [tail, 1.0 - tail])
    return {
        "difference": float(differences.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "confidence": confidence,
        "n_resamples": n_resamples,
        "seed": seed,
        "n_rows": int(rows),
    }


def mean_and_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    if not values:
        raise ValueError("no values")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance)


def summarize_model(
    name: str, scores_by_seed: dict[int | None, list[dict[str, float]]]
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Per-seed corpus means, their mean and std, and each row's scores averaged over seeds.
    `scores_by_seed[seed][row]` holds one row's metrics."""
    per_seed = []
    for seed, row_scores in scores_by_seed.items():
        per_seed.append({"seed": seed, **rouge.corpus_scores(row_scores)})
    rows = len(next(iter(scores_by_seed.values())))
    mean: dict[str, float] = {}
    std: dict[str, float | None] = {}
    for metric in rouge.METRICS:
        mean[metric], std[metric] = mean_and_std([entry[metric] for entry in per_seed])
    row_means = [
        {
            metric: sum(scores[row][metric] for scores in scores_by_seed.values())
            / len(scores_by_seed)
            for metric in rouge.METRICS
        }
        for row in range(rows)
    ]
    summary = {
        "name": name,
        "n_rows": rows,
        "n_seeds": len(per_seed),
        "per_seed": per_seed,
        "mean": mean,
        "std": std,
    }
    return summary, row_means


def compare_to_baseline(
    baseline: str, row_means: dict[str, list[dict[str, float]]]
) -> list[dict[str, Any]]:
    """For every other model and metric: mean(model - baseline) over rows with a paired
    bootstrap interval."""
    differences = []
    base_rows = row_means[baseline]
    for name, rows in row_means.items():
        if name == baseline:
            continue
        for metric in rouge.METRICS:
            result = paired_bootstrap(
                [row[metric] for row in base_rows], [row[metric] for row in rows]
            )
            excludes_zero = result["ci_low"] > 0 or result["ci_high"] < 0
            differences.append(
                {
                    "model": name,
                    "baseline": baseline,
                    "metric": metric,
                    **result,
                    "excludes_zero": excludes_zero,
                }
            )
    return differences


# --------------------------------------------------------------------------- inputs


def load_eval_examples(data_path: str | Path, limit: int | None) -> list[Example]:
    """The held-out rows (each needs a reference), the first `limit` of them when given."""
    _positive(limit, "--limit")
    examples = load_examples(data_path, need_response=True)
    return examples[:limit] if limit is not None else examples


def _check_models(model_specs: Sequence[str], baseline: str | None) -> str:
    from deltakd_cli.models import resolve_source

    if not model_specs:
        raise DeltakdError("give at least one --model (or --predictions FILE)")
    seen = set()
    for spec in model_specs:
        if spec in seen:
            raise DeltakdError(f"--model {spec} is given twice")
        seen.add(spec)
        resolve_source(spec)  # a missing local model fails now, not after hours of generation
    return _check_baseline(list(model_specs), baseline)


def _check_baseline(names: Sequence[str], baseline: str | None) -> str:
    if baseline is None:
        return names[0]
    if baseline not in names:
        raise DeltakdError(f"--baseline {baseline} is not one of the models ({', '.join(names)})")
    return baseline


def _plain_prompt(example: Example, template: str) -> str:
    """The prompt text for a record when no tokenizer is at hand (chat falls back to plain)."""
    return _render_prompt(example, "plain" if template == "chat" else template)


# --------------------------------------------------------------------------- the two modes


def _record(
    example: Example, row: int, model: str, seed: int | None, prompt: str, prediction: str
) -> dict[str, Any]:
    scores = rouge.score_row(prediction, example.references)
    return {
        "id": example.id,
        "row": row,
        "model": model,
        "seed": seed,
        "prompt": prompt,
        "prediction": prediction,
        "references": list(example.references),
        **scores,
    }


def _assemble(
    mode: str,
    data_path: str | Path,
    examples: Sequence[Example],
    limit: int | None,
    records: list[dict[str, Any]],
    model_order: Sequence[str],
    baseline: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The report from the scored records (grouped by model, then seed, rows in data order)."""
    summaries = []
    row_means: dict[str, list[dict[str, float]]] = {}
    for name in model_order:
        scores_by_seed: dict[int | None, list] = {}
        for record in records:
            if record["model"] == name:
                scores_by_seed.setdefault(record["seed"], [None] * len(examples))
                scores_by_seed[record["seed"]][record["row"]] = record
        summary, row_means[name] = summarize_model(name, scores_by_seed)
        summaries.append(summary)
    return {
        "tool": {"name": "deltakd", "version": __version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "data": {
            "path": str(Path(data_path).resolve()),
            "sha256": file_sha256(data_path),
            "rows": len(examples),
            "limit": limit,
        },
        "metrics": {
            "rouge": "rouge_score RougeScorer(use_stemmer=True), F-measure, max over references, "
            "mean over rows, x100",
            "exact_match": "lowercase, ASCII punctuation removed, whitespace collapsed; "
            "max over references, mean over rows, x100",
            "std": "sample standard deviation (n-1) of the per-seed means; null for one run",
        },
        **extra,
        "models": summaries,
        "baseline": baseline,
        "bootstrap": {
            "method": "paired percentile bootstrap over rows, seeds averaged per row first",
            "n_resamples": BOOTSTRAP_RESAMPLES,
            "seed": BOOTSTRAP_SEED,
            "confidence": BOOTSTRAP_CONFIDENCE,
        },
        "differences": compare_to_baseline(baseline, row_means),
    }


def _warn_if_too_long(
    spec: str, model: Any, prompts: Sequence[PreparedPrompt], protocol: Protocol, info: Callable
) -> None:
    """Models with learned positions (GPT-2) fail past their context; say so before it happens."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(len(p.ids) for p in prompts) + protocol.max_new_tokens
    if isinstance(context, int) and longest > context:
        info(
            f"[yellow]warning:[/yellow] {spec}: prompt + new tokens reach {longest} positions, "
            f"past its max_position_embeddings {context}"
        )


def evaluate_models(
    model_specs: Sequence[str],
    data_path: str | Path,
    protocol: Protocol,
    *,
    limit: int | None = None,
    baseline: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate with every model under `protocol`, score, and build the report.
    Returns (report, generation records)."""
    from deltakd_cli import distributed, models
    from deltakd_cli.console import info, progress

    baseline = _check_models(model_specs, baseline)
    examples = load_eval_examples(data_path, limit)
    torch_device = distributed.device_for(device)
    models.check_device(torch_device)
    # Under torchrun every rank generates its share of the batches (data parallel).
    distributed.init(torch_device)
    rank, world = distributed.rank(), distributed.world_size()
    torch_dtype = models.resolve_dtype(dtype, torch_device)
    records: list[dict[str, Any]] = []
    identities = {}
    truncated_counts = {}
    runs = len(protocol.seeds)
    # Every tokenizer and prompt first: an unreadable model or a template it cannot render
    # fails before any generation.
    tokenizers, prompts_of = {}, {}
    for spec in model_specs:
        tokenizers[spec] = models.load_tokenizer(spec)
        prompts_of[spec] = prepare_prompts(
            examples, protocol.template, tokenizers[spec], protocol.max_prompt_length
        )
        truncated_counts[spec] = sum(p.truncated for p in prompts_of[spec])
    with progress() as bar:
        for spec in model_specs:
            tokenizer, prompts = tokenizers[spec], prompts_of[spec]
            model = models.load_model(spec, dtype=torch_dtype, device=torch_device)
            if rank == 0:
                identities[spec] = models.model_identity(spec, tokenizer)
            _warn_if_too_long(spec, model, prompts, protocol, info)
            mine = sum(
                len(rows)
                for _, rows in rank_batches(
                    [len(p.ids) for p in prompts], protocol.batch_size, (rank, world)
                )
            )
            shown = spec + (f" (rank 0 of {world})" if world > 1 else "")
            task = bar.add_task(shown, total=mine * runs)
            for seed in protocol.seeds:
                bar.update(task, description=shown + (f" seed {seed}" if seed is not None else ""))
                texts = generate_texts(
                    model,
                    tokenizer,
                    [p.ids for p in prompts],
                    protocol,
                    seed,
                    on_batch=lambda n, task=task: bar.advance(task, n),
                    shard=(rank, world),
                )
                texts = merge_shards(distributed.all_gather_objects(texts))
                for row, (example, prompt, text) in enumerate(
                    zip(examples, prompts, texts, strict=True)
                ):
                    records.append(_record(example, row, spec, seed, prompt.text, text))
            del model
            if torch_device.type == "cuda":
                torch.cuda.empty_cache()
    for spec, count in truncated_counts.items():
        if count:
            info(
                f"{spec}: {count} prompt(s) longer than {protocol.max_prompt_length} tokens "
                "were cut from the left"
            )
    extra = {
        "protocol": {
            **protocol.to_report(),
            "device": str(torch_device),
            "dtype": str(torch_dtype).removeprefix("torch."),
        },
        "predictions": None,
    }
    extra["protocol"]["processes"] = world
    identities = distributed.broadcast_object(identities)
    report = _assemble(
        "generate", data_path, examples, limit, records, list(model_specs), baseline, extra
    )
    for summary in report["models"]:
        summary["identity"] = identities[summary["name"]]
        summary["prompts_truncated"] = truncated_counts[summary["name"]]
    return report, records


def _seed_value(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise DeltakdError(f"{where}: 'seed' must be an integer or null, got {value!r}")


def _read_prediction_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, object) for every non-blank line; each needs a string `prediction`."""
    if not path.is_file():
        raise DeltakdError(f"predictions file not found: {path}")
    lines: list[tuple[str, dict[str, Any]]] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    entry = json.loads(text)
                except json.JSONDecodeError as error:
                    raise DeltakdError(f"{where}: not valid JSON ({error.msg})") from None
                if not isinstance(entry, dict):
                    raise DeltakdError(f"{where}: expected a JSON object")
                if not isinstance(entry.get("prediction"), str):
                    raise DeltakdError(f"{where}: needs a string field 'prediction'")
                lines.append((where, entry))
    except UnicodeDecodeError:
        raise DeltakdError(f"{path}: not UTF-8 text") from None
    except OSError as error:
        raise DeltakdError(f"cannot read predictions file {path}: {error.strerror}") from None
    if not lines:
        raise DeltakdError(f"{path}: no predictions (the file is empty)")
    return lines


def load_predictions(
    path: str | Path, all_examples: Sequence[Example], rows: int
) -> tuple[list[dict[str, Any]], str]:
    """Predictions aligned to the first `rows` data rows, and how they were matched ("id" or
    "order"). Entries: {row, model, seed, prediction, prompt}, grouped by (model, seed) in file
    order, rows in data order. Lines carrying `id` match data rows by id (ids past `rows`, i.e.
    cut by --limit, are skipped); lines without match by order within their (model, seed) group,
    which must then hold as many lines as the data (or --limit) has rows. Lines without `model`
    belong to a model named after the file. A line's optional `references` must equal the data's.
    The first problem raises one DeltakdError."""
    path = Path(path)
    lines = _read_prediction_lines(path)
    default_model = path.name.removesuffix(".jsonl").removesuffix(".generations")
    with_id = [("id" in entry) for _, entry in lines]
    if any(with_id) and not all(with_id):
        where = lines[with_id.index(False)][0]
        raise DeltakdError(
            f"{where}: no 'id' field, but other lines have one (use ids on all lines or none)"
        )
    by_id = all(with_id)
    row_of_id: dict[str, int] = {}
    if by_id:
        for index, example in enumerate(all_examples):
            if example.id in row_of_id:
                raise DeltakdError(
                    f"the data has the id '{example.id}' twice; match predictions by order instead"
                )
            row_of_id[example.id] = index

    groups: dict[tuple[str, int | None], list[tuple[str, dict[str, Any]]]] = {}
    for where, entry in lines:
        model = entry.get("model", default_model)
        if not isinstance(model, str) or not model:
            raise DeltakdError(f"{where}: 'model' must be a non-empty string")
        seed = _seed_value(entry.get("seed"), where)
        groups.setdefault((model, seed), []).append((where, entry))

    entries = []
    for (model, seed), group in groups.items():
        label = f"model {model}, seed {seed}"
        by_row: dict[int, tuple[str, dict[str, Any]]] = {}
        if by_id:
            for where, entry in group:
                row = row_of_id.get(str(entry["id"]))
                if row is None:
                    raise DeltakdError(f"{where}: id '{entry['id']}' is not in the data")
                if row in by_row:
                    raise DeltakdError(
                        f"{where}: a second prediction for id '{entry['id']}' ({label})"
                    )
                if row < rows:  # rows past --limit are not scored
                    by_row[row] = (where, entry)
        else:
            if len(group) not in (rows, len(all_examples)):
                detail = (
                    f"first extra line {group[rows][0]}"
                    if len(group) > rows
                    else f"first row without one: id '{all_examples[len(group)].id}'"
                )
                raise DeltakdError(
                    f"{path}: {label} has {len(group)} predictions but the data has {rows} rows "
                    f"({detail}); add 'id' fields to match by id"
                )
            by_row = dict(enumerate(group[:rows]))
        missing = [row for row in range(rows) if row not in by_row]
        if missing:
            raise DeltakdError(
                f"{path}: {label} has no prediction for id '{all_examples[missing[0]].id}' "
                f"({len(missing)} of {rows} rows missing)"
            )
        for row in range(rows):
            where, entry = by_row[row]
            stated = entry.get("references")
            if stated is not None and stated != all_examples[row].references:
                # e.g. our own generations file scored against another data file
                raise DeltakdError(
                    f"{where}: its 'references' differ from the data's for id "
                    f"'{all_examples[row].id}' (were these predictions made for this --data?)"
                )
            prompt = entry.get("prompt")
            entries.append(
                {
                    "row": row,
                    "model": model,
                    "seed": seed,
                    "prediction": entry["prediction"],
                    "prompt": prompt if isinstance(prompt, str) else None,
                }
            )
    return entries, "id" if by_id else "order"


def evaluate_predictions(
    predictions_path: str | Path,
    data_path: str | Path,
    *,
    limit: int | None = None,
    baseline: str | None = None,
    template: str = "alpaca",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score an existing JSONL of generations against the data without loading a model."""
    if template not in TEMPLATES:
        raise DeltakdError(f"unknown template '{template}' (choose from {', '.join(TEMPLATES)})")
    _positive(limit, "--limit")
    all_examples = load_examples(data_path, need_response=True)
    examples = all_examples[:limit] if limit is not None else all_examples
    entries, matched_by = load_predictions(predictions_path, all_examples, len(examples))
    model_order: list[str] = []
    for entry in entries:
        if entry["model"] not in model_order:
            model_order.append(entry["model"])
    baseline = _check_baseline(model_order, baseline)
    records = []
    for entry in entries:
        example = examples[entry["row"]]
        prompt = (
            entry["prompt"]
            if isinstance(entry["prompt"], str)
            else _plain_prompt(example, template)
        )
        records.append(
            _record(
                example, entry["row"], entry["model"], entry["seed"], prompt, entry["prediction"]
            )
        )
    extra = {
        "protocol": None,
        "predictions": {
            "path": str(Path(predictions_path).resolve()),
            "sha256": file_sha256(predictions_path),
            "matched_by": matched_by,
        },
    }
    report = _assemble(
        "predictions", data_path, examples, limit, records, model_order, baseline, extra
    )
    return report, records


# --------------------------------------------------------------------------- outputs


def generations_path(report_path: str | Path) -> Path:
    """REPORT.json -> REPORT.generations.jsonl (next to it)."""
    report_path = Path(report_path)
    stem = report_path.name.removesuffix(".json")
    return report_path.with_name(f"{stem}.generations.jsonl")


def _is_report(path: Path) -> bool:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(report, dict) and (report.get("tool") or {}).get("name") == "deltakd"


def prepare_output(
    report_path: str | Path,
    inputs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Check the report can be written before any work: not a directory, not an input (nor
    its generations file), not an existing file unless --overwrite; its folder is created."""
    report_path = Path(local_path(report_path))
    if report_path.is_dir():
        raise DeltakdError(f"--out {report_path} is a directory; give a file name like report.json")
    for path in (report_path, generations_path(report_path)):
        outputs.check_not_input(path, inputs or {})
    for path in (report_path, generations_path(report_path)):
        if path.exists() and not overwrite:
            what = "an eval report of an earlier run" if _is_report(path) else "a file"
            raise DeltakdError(
                f"{path} already exists ({what}); choose another --out, or pass --overwrite "
                "to replace it"
            )
    with outputs.writing(report_path.parent):
        report_path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(report_path.parent, os.W_OK):
        raise DeltakdError(f"cannot write to {report_path.parent}")
    return report_path


def write_outputs(
    report: dict[str, Any], records: Sequence[dict[str, Any]], report_path: str | Path
) -> tuple[Path, Path]:
    """Write REPORT.generations.jsonl, then REPORT.json (each whole or not at all; the report
    last, so a report never points at generations that are not there)."""
    report_path = Path(local_path(report_path))
    records_path = generations_path(report_path)
    report = {**report, "generations_file": records_path.name}
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    outputs.atomic_write_text(records_path, lines)
    outputs.atomic_write_text(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report_path, records_path


def _cell(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def report_tables(report: dict[str, Any]) -> list[Any]:
    """Rich tables: model x metric (mean ± std over seeds), and ROUGE-L differences from the
    baseline with their bootstrap intervals."""
    from rich.table import Table

    protocol = report.get("protocol")
    caption = (
        f"protocol {protocol['name']}, {len(protocol['seeds']) or 1} run(s) per model"
        if protocol
        else f"scored from {Path(report['predictions']['path']).name}"
    )
    scores = Table(
        title=f"{Path(report['data']['path']).name}: {report['data']['rows']} rows", caption=caption
    )
    scores.add_column("model", overflow="fold")
    for metric in rouge.METRICS:
        scores.add_column(rouge.METRIC_LABELS[metric], justify="right")
    scores.add_column("runs", justify="right")
    for summary in report["models"]:
        cells = [_cell(summary["mean"][m], summary["std"][m]) for m in rouge.METRICS]
        scores.add_row(summary["name"], *cells, str(summary["n_seeds"]))
    tables = [scores]
    rouge_l = [d for d in report["differences"] if d["metric"] == "rougeL"]
    if rouge_l:
        confidence = round(100 * report["bootstrap"]["confidence"])
        diffs = Table(title=f"ROUGE-L difference from {report['baseline']} (paired bootstrap)")
        diffs.add_column("model", overflow="fold")
        diffs.add_column("difference", justify="right")
        diffs.add_column(f"{confidence}% interval", justify="right")
        diffs.add_column("beyond noise", justify="center")
        for entry in rouge_l:
            diffs.add_row(
                entry["model"],
                f"{entry['difference']:+.2f}",
                f"[{entry['ci_low']:+.2f}, {entry['ci_high']:+.2f}]",
                "yes" if entry["excludes_zero"] else "no",
            )
        tables.append(diffs)
    return tables
