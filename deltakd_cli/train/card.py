"""The model card (README.md) of an exported model directory: what it was made from (base
student, teachers and data with their hashes, the cache), how (objective, alpha, steps, tokens),
how well (held-out loss, and the eval result when a pipeline has one), and how to make it again.
A pure function of the run's record; `pipeline` calls it again with the eval result."""

from __future__ import annotations

from typing import Any

from deltakd_cli.method import objectives
from deltakd_cli.outputs import is_local_location as _is_local
from deltakd_cli.outputs import public_name

TAIL_WORDS = {
    "bucket": "one tail bucket (the target's mass outside the kept ids; its shape untrained)",
    "sampled": "the cache's drawn tail ids, importance-weighted (unbiased)",
    "corrected": "the tail bucket plus a sampled correction (unbiased; quiet near S0)",
}


def _tail_text(resolved: dict[str, Any], cache: dict[str, Any]) -> str:
    """How the run trained the tail outside the kept ids: the estimator actually used (run.json's
    resolved tail), whether it was the objective's default, and the bucket's rule."""
    tail = resolved.get("tail") or "bucket"
    name = tail.split(" ")[0]
    words = f"{tail}: {TAIL_WORDS.get(name, tail)}"
    if resolved.get("tail_default"):
        words += ", the objective's default"
    if name != "sampled" and cache.get("tail_rule"):
        words += f"; bucket rule {cache['tail_rule']}"
    return words


def objective_settings(options: dict[str, Any]) -> list[tuple[str, Any]]:
    """The run's objective as (name, value) pairs: its name, every setting it reads (from the
    registry, so a new objective's settings are recorded without a change here), and lambda and
    the temperature for an objective that distils. The card and `deltakd report` show these."""
    name = options.get("objective", "sft")
    entry = objectives.OBJECTIVES.get(name)
    pairs: list[tuple[str, Any]] = [("objective", name)]
    if entry is None:
        return pairs
    pairs += [(setting, options.get(setting)) for setting in entry.reads]
    if entry.needs_cache:
        pairs.append(("sft weight (lambda)", options.get("sft_weight")))
        pairs.append(("temperature", options.get("temperature")))
    return pairs


def objective_rows(options: dict[str, Any]) -> list[str]:
    """The card's rows for the run's objective (objective_settings as a table)."""
    rows = []
    for setting, value in objective_settings(options):
        rows.append(f"| {setting} | `{value}` |" if setting == "objective" else
                    f"| {setting} | {value} |")  # fmt: skip
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


def model_hub_id(entry: Any) -> str | None:
    """The Hub id of a recorded model (models.model_identity), or None for a local one: a Hub
    model is recorded with `path` equal to its id; a local one with its resolved path."""
    if not isinstance(entry, dict) or not entry.get("spec") or entry.get("gguf_file"):
        return None
    spec, path = str(entry["spec"]), str(entry.get("path") or "")
    if path and path != spec:
        return None
    if _is_local(spec) or spec.count("/") != 1:
        return None
    return spec


def data_hub_id(entry: Any) -> str | None:
    """The Hub id of a recorded data source (sources.fingerprint), or None for local rows."""
    return str(entry["hub"]) if isinstance(entry, dict) and entry.get("hub") else None


def _data_name(entry: dict[str, Any]) -> str:
    """A recorded data source as a card names it: its Hub id, else its file or folder name."""
    return data_hub_id(entry) or public_name(entry.get("spec") or entry.get("path") or "?")


def _model_row(role: str, entry: Any) -> str | None:
    if not isinstance(entry, dict) or not entry.get("spec"):
        return None
    revision = f" @ {entry['revision']}" if entry.get("revision") else ""
    return (
        f"| {role} | `{public_name(entry['spec'])}`{revision} | weights "
        f"{_short(entry.get('weights_sha256'))}, "
        f"tokenizer {_short(entry.get('tokenizer_sha256'))} |"
    )


def _lora_rows(described: Any, label: str = "LoRA (merged into the weights)") -> list[str]:
    """The LoRA settings of a LoRA student (exported merged), or nothing."""
    if not isinstance(described, dict):
        return []
    targets = ", ".join(described.get("target_modules") or [])
    trainable, total = described.get("trainable_parameters"), described.get("parameters")
    counts = f"; trainable {trainable:,} of {total:,}" if trainable and total else ""
    return [
        f"| {label} | r {described.get('r')}, alpha "
        f"{described.get('alpha')}, on {targets}{counts} |"
    ]


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


TAGS = ("deltakd", "knowledge-distillation")  # every card's; the objective's follow (objectives.py)
ROUGE_L = "rougeL"  # the model-index metric type of the pipeline's ROUGE-L


def training_data(record: dict[str, Any]) -> dict[str, Any]:
    """The recorded source of the rows a run trained on: the cache's data for distill, the rows
    themselves for finetune."""
    provenance = record.get("provenance") or {}
    cached = provenance.get("cache_provenance") or {}
    return cached.get("data") or provenance.get("data") or {}


def _eval_data(evaluation: dict[str, Any]) -> str:
    data = evaluation.get("data")
    return f" of `{_data_name(data)}`" if isinstance(data, dict) and data else ""


def card_data(record: dict[str, Any], evaluation: dict[str, Any] | None = None) -> Any:
    """The card's metadata (huggingface_hub's ModelCardData): base_model when the student came
    from the Hub, datasets when the rows did, the student's own license, the tags, and a
    model-index entry with the pipeline's ROUGE-L when there is one. Nothing local is named."""
    from huggingface_hub import EvalResult, ModelCardData

    options = record.get("options") or {}
    student = record.get("student") or {}
    dataset = data_hub_id(training_data(record))
    name = public_name(options.get("out") or "model")
    results = None
    if evaluation and isinstance(evaluation.get("rouge_l"), (int, float)):
        held_out = evaluation.get("data") if isinstance(evaluation.get("data"), dict) else {}
        results = [
            EvalResult(
                task_type="text-generation",
                dataset_type=data_hub_id(held_out) or "json",
                dataset_name=_data_name(held_out) if held_out else "held-out rows",
                dataset_split=held_out.get("split") if data_hub_id(held_out) else None,
                metric_type=ROUGE_L,
                metric_name="ROUGE-L",
                metric_value=round(float(evaluation["rouge_l"]), 2),
            )
        ]
    return ModelCardData(
        model_name=name,
        base_model=model_hub_id(student),
        datasets=[dataset] if dataset else None,
        license=student.get("license") or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[*TAGS, *objective_summary(options)[1]],
        eval_results=results,
    )


def _with_metadata(data: Any, body: str) -> str:
    """The card's text: the metadata as YAML front matter, then the body (huggingface_hub's
    ModelCard reads it back)."""
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def adapter_card(record: dict[str, Any]) -> str:
    """README.md of OUT/adapter (--save-adapter): the LoRA adapter alone, loaded with peft on
    top of the base student (base_model when that is on the Hub)."""
    from huggingface_hub import ModelCardData

    options = record.get("options") or {}
    resolved = record.get("resolved") or {}
    student = record.get("student") or {}
    name = public_name(options.get("out") or "model")
    base = model_hub_id(student)
    data = ModelCardData(
        model_name=f"{name}-adapter",
        base_model=base,
        license=student.get("license") or None,
        library_name="peft",
        tags=[*TAGS, *objective_summary(options)[1], "lora"],
    )
    lines = [
        f"# {name}: the LoRA adapter",
        "",
        f"The LoRA adapter alone of `{name}` (deltakd {record.get('version', '?')}, "
        f"`deltakd {record.get('command', 'distill')}`, {objective_summary(options)[0]}); the "
        "parent directory holds the same model with the adapter merged into its weights.",
        "",
        "| role | model | sha256 |",
        "|---|---|---|",
        *[row for row in [_model_row("base student", student)] if row],
        "",
        "| | |",
        "|---|---|",
        *_lora_rows(resolved.get("lora"), "LoRA"),
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base or "BASE"}")',
        'model = PeftModel.from_pretrained(base, "ADAPTER")  # this directory or its Hub id',
        "```",
        "",
    ]
    if not base:
        lines.append("BASE: the base student named above (its sha256 identifies it).\n")
    return _with_metadata(data, "\n".join(lines))


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
    name = public_name(options.get("out") or "model")
    lines = [
        f"# {name}",
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
        lines.append(
            f"| training data | `{_data_name(data)}` (sha256 {_short(data.get('sha256'))}) |"
        )
    if cache:
        lines.append(
            f"| teachers' cache | `{public_name(cache.get('path') or '?')}`: "
            f"top-{cache.get('k')} "
            f"({cache.get('selection')})"
            + (f" + {cache['tail_samples']} tail draws" if cache.get("tail_samples") else "")
            + f", {(cache.get('counts') or {}).get('response_tokens', '?')} response tokens, "
            f"manifest {_short(cache.get('manifest_sha256'))} |"
        )
        lines.append(f"| tail | {_tail_text(resolved, cache)} |")
    held_out = provenance.get("eval_data") or {}
    for key in ("cache", "data"):
        entry = held_out.get(key)
        if isinstance(entry, dict):
            where = data_hub_id(entry) or public_name(entry.get("path") or entry.get("spec") or "?")
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
            f"held-out rows{_eval_data(evaluation)} ({evaluation.get('protocol', '')}); the "
            f"full table: `{public_name(evaluation.get('report') or '?')}` of the pipeline.",
        ]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        f"deltakd {command} --config {name}/run.json --out NEW_DIR",
        "```",
        "",
        "`run.json` in the run's directory records every option and input hash; "
        "`metrics.jsonl` every logged step.",
        "",
    ]
    return _with_metadata(card_data(record, evaluation), "\n".join(lines))
