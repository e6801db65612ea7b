"""The model card (README.md) of an exported model directory: what it was made from (base
student, teachers and data with their hashes, the cache), how (objective, alpha, steps, tokens),
how well (held-out loss, and the eval result when a pipeline has one), and how to make it again.
A pure function of the run's record; `pipeline` calls it again with the eval result."""

from __future__ import annotations

from typing import Any

from deltakd_cli import objectives


def objective_rows(options: dict[str, Any]) -> list[str]:
    """The card's rows for the run's objective: its name, every setting it reads (from the
    registry, so a new objective's settings are recorded without a change here), and lambda for
    an objective that distils."""
    name = options.get("objective", "sft")
    entry = objectives.OBJECTIVES.get(name)
    rows = [f"| objective | `{name}` |"]
    if entry is None:
        return rows
    rows += [f"| {setting} | {options.get(setting)} |" for setting in entry.reads]
    if entry.needs_cache:
        rows.append(f"| sft weight (lambda) | {options.get('sft_weight')} |")
        rows.append(f"| temperature | {options.get('temperature')} |")
    return rows


def objective_summary(options: dict[str, Any]) -> tuple[str, list[str]]:
    """(what the objective is, in one phrase; its model card tags)."""
    name = options.get("objective", "sft")
    entry = objectives.OBJECTIVES.get(name)
    if entry is None:
        return name, []
    return entry.description, list(entry.tags)


def _short(sha: Any) -> str:
    return f"`{str(sha)[:12]}`" if sha else "-"


def _model_row(role: str, entry: Any) -> str | None:
    if not isinstance(entry, dict) or not entry.get("spec"):
        return None
    revision = f" @ {entry['revision']}" if entry.get("revision") else ""
    return (
        f"| {role} | `{entry['spec']}`{revision} | weights {_short(entry.get('weights_sha256'))},"
        f" tokenizer {_short(entry.get('tokenizer_sha256'))} |"
    )


def _lora_rows(described: Any) -> list[str]:
    """The LoRA settings of a LoRA student (exported merged), or nothing."""
    if not isinstance(described, dict):
        return []
    targets = ", ".join(described.get("target_modules") or [])
    trainable, total = described.get("trainable_parameters"), described.get("parameters")
    counts = f"; trainable {trainable:,} of {total:,}" if trainable and total else ""
    return [
        f"| LoRA (merged into the weights) | r {described.get('r')}, alpha "
        f"{described.get('alpha')}, on {targets}{counts} |"
    ]


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def model_card(record: dict[str, Any], evaluation: dict[str, Any] | None = None) -> str:
    """README.md for the model a run exported (`record` is its run.json). `evaluation`, when
    given: {"rouge_l": mean, "std": ..., "protocol": one line, "rows": N, "report": path}."""
    options = record.get("options") or {}
    resolved = record.get("resolved") or {}
    provenance = record.get("provenance") or {}
    metrics = record.get("final_metrics") or {}
    command = record.get("command", "distill")
    description, tags = objective_summary(options)
    student = record.get("student") or {}
    cached = provenance.get("cache_provenance") or {}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [" + ", ".join(["deltakd", "knowledge-distillation", *tags]) + "]",
        "---",
        "",
        f"# {options.get('out', 'model')}",
        "",
        f"Trained with deltakd {record.get('version', '?')} (`deltakd {command}`): "
        f"{description}.",
        "",
        "## Made from",
        "",
        "| role | model | sha256 |",
        "|---|---|---|",
    ]  # fmt: skip
    rows = [
        _model_row("base student", student),
        _model_row("base teacher", cached.get("teacher_base")),
        _model_row("tuned teacher", cached.get("teacher_tuned")),
        _model_row("cached base student", cached.get("student")),
    ]
    lines += [row for row in rows if row]
    data = cached.get("data") or provenance.get("data") or {}
    cache = provenance.get("cache") or {}
    lines += ["", "| | |", "|---|---|"]
    if data:
        where = data.get("spec") or data.get("path") or "?"
        lines.append(f"| training data | `{where}` (sha256 {_short(data.get('sha256'))}) |")
    if cache:
        lines.append(
            f"| teachers' cache | `{cache.get('path')}`: top-{cache.get('k')} "
            f"({cache.get('selection')}), {cache.get('tail_rule')} tail, "
            f"{(cache.get('counts') or {}).get('response_tokens', '?')} response tokens, "
            f"manifest {_short(cache.get('manifest_sha256'))} |"
        )
    held_out = provenance.get("eval_data") or {}
    for key in ("cache", "data"):
        entry = held_out.get(key)
        if isinstance(entry, dict):
            where = entry.get("path") or entry.get("spec")
            sha = entry.get("manifest_sha256") or entry.get("sha256")
            lines.append(f"| held-out data | `{where}` ({_short(sha)}) |")
    lines += [
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        *objective_rows(options),
    ]
    lines += [
        f"| steps | {resolved.get('total_steps', metrics.get('steps', '-'))} |",
        f"| target tokens | {metrics.get('target_tokens', '-'):,} |"
        if isinstance(metrics.get("target_tokens"), int)
        else "| target tokens | - |",
        f"| epochs, lr, batch size | {options.get('epochs')}, {options.get('lr')}, "
        f"{options.get('batch_size')} x {options.get('grad_accum', 1)} x "
        f"{resolved.get('world_size', 1)} process(es) |",
        f"| seed, dtype | {options.get('seed')}, {resolved.get('compute_dtype')} |",
        *_lora_rows(resolved.get("lora")),
        f"| final training loss | {_number(metrics.get('final_loss'))} |",
    ]
    if "eval_loss" in metrics:
        lines.append(f"| held-out loss (last) | {_number(metrics.get('eval_loss'))} |")
    if "best_eval_loss" in metrics:
        lines.append(
            f"| held-out loss (best, exported: step {resolved.get('exported_step')}) | "
            f"{_number(metrics.get('best_eval_loss'))} |"
        )
    if evaluation:
        spread = f" ± {evaluation['std']:.2f}" if evaluation.get("std") else ""
        lines += [
            "",
            "## Evaluation",
            "",
            f"ROUGE-L **{evaluation['rouge_l']:.2f}**{spread} on {evaluation.get('rows', '?')} "
            f"held-out rows ({evaluation.get('protocol', '')}); the full table: "
            f"`{evaluation.get('report', '')}`.",
        ]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        f"deltakd {command} --config {options.get('out', 'OUT')}/run.json --out NEW_DIR",
        "```",
        "",
        "`run.json` next to this card records every option and input hash; `metrics.jsonl` "
        "every logged step.",
        "",
    ]
    return "\n".join(lines)
