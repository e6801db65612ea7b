"""`deltakd eval`: generate with every model under a protocol (or read generations made
elsewhere), score every row, and write the report. The parts: protocol.py (how text is
generated), generate.py (batched generation), rouge.py (the scorer), stats.py (spread and
paired differences), predictions.py (outside generations), report.py (the files and tables)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from deltakd_cli.data import Columns, Example, columns_of, load_examples, render_prompt
from deltakd_cli.errors import DeltakdError, Interrupted
from deltakd_cli.evaluate.generate import (
    PreparedPrompt,
    batches_of_rank,
    generate_texts,
    merge_shards,
    prepare_prompts,
)
from deltakd_cli.evaluate.options import EvalOptions
from deltakd_cli.evaluate.predictions import load_predictions
from deltakd_cli.evaluate.protocol import Protocol, make_protocol
from deltakd_cli.evaluate.report import assemble, make_record
from deltakd_cli.options import PATHS_ARE, absolute_paths, check
from deltakd_cli.options import record as options_record
from deltakd_cli.sources import file_sha256


def load_eval_examples(
    data_path: Any, limit: int | None, columns: Columns | None = None
) -> list[Example]:
    """The held-out rows (each needs a reference), the first `limit` of them when given.
    `data_path` is a path or a sources.DataSource."""
    examples = load_examples(data_path, need_response=True, columns=columns)
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
    return render_prompt(example, "plain" if template == "chat" else template)


def split_labels(specs: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """--model NAME=MODEL... -> (the models, {model: NAME}). A spec is labelled when it has an
    `=` with a name before it that holds no path separator and the whole spec is no existing
    path (a hub id or a directory never has that shape)."""
    models, labels = [], {}
    for spec in specs:
        name, sep, model = spec.partition("=")
        if sep and name.strip() and model.strip() and "/" not in name and not Path(spec).exists():
            if name.strip() in labels.values():
                raise DeltakdError(f"--model {spec}: the name {name.strip()} is given twice")
            models.append(model.strip())
            labels[model.strip()] = name.strip()
        else:
            models.append(spec)
    return models, labels


def parse_groups(texts: Sequence[str], models: Sequence[str]) -> dict[str, list[str]]:
    """--group NAME=MODEL,MODEL... -> {name: models}; every model must be one being evaluated,
    and in one group at most."""
    groups: dict[str, list[str]] = {}
    seen: set[str] = set()
    for text in texts:
        name, sep, members = text.partition("=")
        listed = [member.strip() for member in members.split(",") if member.strip()]
        if not sep or not name.strip() or not listed:
            raise DeltakdError(f"--group: expected NAME=MODEL,MODEL..., got '{text}'")
        for model in listed:
            if model not in models:
                raise DeltakdError(f"--group {name}: {model} is not one of the models")
            if model in seen:
                raise DeltakdError(f"--group {name}: {model} is already in another group")
            seen.add(model)
        groups[name.strip()] = listed
    return groups


def parse_comparisons(
    texts: Sequence[str], groups: dict[str, list[str]], models: Sequence[str]
) -> list[tuple[str, str]]:
    """--compare A:B -> [(A, B)]: A minus B, each a group or a model in no group."""
    grouped = {model for members in groups.values() for model in members}
    names = set(groups) | {model for model in models if model not in grouped}
    pairs = []
    for text in texts:
        first, sep, second = text.rpartition(":")
        if not sep or not first or not second:
            raise DeltakdError(f"--compare: expected A:B (A minus B), got '{text}'")
        for name in (first, second):
            if name not in names:
                raise DeltakdError(
                    f"--compare {text}: {name} is not a group or a model in no group"
                )
        pairs.append((first, second))
    return pairs


# --------------------------------------------------------------------------- the two modes


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
    groups: dict[str, list[str]] | None = None,
    comparisons: Sequence[tuple[str, str]] = (),
    columns: Columns | None = None,
    load: Any = None,
    template_from: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate with every model under `protocol`, score, and build the report. With
    `template_from`, that model's tokenizer renders every prompt (its chat template) and its
    EOS stops every model too (models sharing its token ids, as a base/instruct pair does).
    Returns (report, generation records)."""
    from deltakd_cli import distributed, models, vocab
    from deltakd_cli.console import info, progress

    load = load or models.DEFAULT_LOAD
    baseline = _check_models(model_specs, baseline)
    examples = load_eval_examples(data_path, limit, columns)
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
    template_tokenizer = models.load_tokenizer(template_from, load) if template_from else None
    stop_ids = [template_tokenizer.eos_token_id] if template_tokenizer is not None else []
    tokenizers, prompts_of = {}, {}
    for spec in model_specs:
        tokenizers[spec] = models.load_tokenizer(spec, load)
        renderer = tokenizers[spec]
        if template_tokenizer is not None:
            compatibility = vocab.compare(
                {f"--template-from {template_from}": template_tokenizer, spec: renderer}
            )
            for note in compatibility.notes:
                info(f"[yellow]note:[/yellow] {note}")
            renderer = template_tokenizer
        prompts_of[spec] = prepare_prompts(
            examples, protocol.template, renderer, protocol.max_prompt_length
        )
        truncated_counts[spec] = sum(p.truncated for p in prompts_of[spec])
    with progress("generation") as bar:
        for spec in model_specs:
            tokenizer, prompts = tokenizers[spec], prompts_of[spec]
            model = models.load_model(spec, torch_dtype, torch_device, settings=load)
            models.check_model_vocab(model, len(tokenizer), f"model {spec} (its tokenizer's ids)")
            if rank == 0:
                identities[spec] = models.model_identity(spec, tokenizer, load)
            _warn_if_too_long(spec, model, prompts, protocol, info)
            mine = sum(
                len(rows)
                for _, rows in batches_of_rank(
                    [len(p.ids) for p in prompts], protocol.batch_size, (rank, world)
                )
            )
            shown = spec + (f" (rank 0 of {world})" if world > 1 else "")
            task = bar.add_task("eval", total=mine * runs, status=shown)
            for seed in protocol.seeds:
                bar.update(task, status=shown + (f" seed {seed}" if seed is not None else ""))
                texts = generate_texts(
                    model,
                    tokenizer,
                    [p.ids for p in prompts],
                    protocol,
                    seed,
                    on_batch=lambda n, task=task: bar.advance(task, n),
                    shard=(rank, world),
                    stop_ids=stop_ids,
                )
                texts = merge_shards(distributed.all_gather_objects(texts))
                for row, (example, prompt, text) in enumerate(
                    zip(examples, prompts, texts, strict=True)
                ):
                    records.append(make_record(example, row, spec, seed, prompt.text, text))
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
            "template_from": template_from,
        },
        "predictions": None,
    }
    extra["protocol"]["processes"] = world
    identities = distributed.broadcast_object(identities)
    report = assemble(
        "generate",
        data_path,
        examples,
        limit,
        records,
        list(model_specs),
        baseline,
        extra,
        groups,
        comparisons,
    )
    for summary in report["models"]:
        summary["identity"] = identities[summary["name"]]
        summary["prompts_truncated"] = truncated_counts[summary["name"]]
    return report, records


def evaluate_predictions(
    predictions_path: str | Path,
    data_path: str | Path,
    *,
    limit: int | None = None,
    baseline: str | None = None,
    template: str = "alpaca",
    groups_text: Sequence[str] = (),
    compare_text: Sequence[str] = (),
    columns: Columns | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score an existing JSONL of generations against the data without loading a model
    (groups and comparisons as --group/--compare give them, over the file's model names)."""
    all_examples = load_examples(data_path, need_response=True, columns=columns)
    examples = all_examples[:limit] if limit is not None else all_examples
    entries, matched_by = load_predictions(predictions_path, all_examples, len(examples))
    model_order: list[str] = []
    for entry in entries:
        if entry["model"] not in model_order:
            model_order.append(entry["model"])
    baseline = _check_baseline(model_order, baseline)
    groups = parse_groups(groups_text, model_order)
    comparisons = parse_comparisons(compare_text, groups, model_order)
    records = []
    for entry in entries:
        example = examples[entry["row"]]
        prompt = (
            entry["prompt"]
            if isinstance(entry["prompt"], str)
            else _plain_prompt(example, template)
        )
        records.append(
            make_record(
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
    report = assemble(
        "predictions",
        data_path,
        examples,
        limit,
        records,
        model_order,
        baseline,
        extra,
        groups,
        comparisons,
    )
    return report, records


# --------------------------------------------------------------------------- the command


def recorded(options: EvalOptions) -> dict[str, Any]:
    """The options as the report records them: local paths absolute, except the models, which
    stay as given (they are the report's names for them, in --group, --compare, --baseline)."""
    return absolute_paths(options_record(options), EvalOptions, keep=("model",))


def finished_report(options: EvalOptions) -> dict[str, Any] | None:
    """The report at --out when it records this very eval, whole: the same options, the same
    data and predictions by content, every model's weights by content. None otherwise (a rerun
    of other settings is then refused by `prepare_output`, unless --overwrite)."""
    from deltakd_cli import models, sources
    from deltakd_cli.evaluate.report import generations_path
    from deltakd_cli.outputs import local_path

    path = Path(local_path(options.out))
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        if not generations_path(path).is_file():
            return None
        if report.get("options") != json.loads(json.dumps(recorded(options), default=str)):
            return None
        data = sources.fingerprint(options.data_source(options.data))
        if report["data"].get("sha256") != data.get("sha256"):
            return None
        if options.predictions is not None:
            made_from = (report.get("predictions") or {}).get("sha256")
            return report if made_from == file_sha256(Path(options.predictions)) else None
        load = options.load_settings()
        for model in report["models"]:
            identity = model.get("identity") or {}
            if identity.get("weights_sha256") != models.weights_fingerprint(model["name"], load):
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DeltakdError):
        return None
    return report


def run_eval(options: EvalOptions) -> dict[str, Any]:
    """`deltakd eval`: check everything, generate (or read) and score, print, write."""
    from rich.console import Console

    from deltakd_cli import distributed, outputs
    from deltakd_cli.console import console, info
    from deltakd_cli.evaluate import report as report_files

    check(options)
    distributed.set_timeout(options.resolved_dist_timeout())
    models, labels = split_labels(options.model)
    # A label is a group of one: the tables and --compare name the model by it.
    group_text = [*options.group, *(f"{name}={model}" for model, name in labels.items())]
    baseline = {name: model for model, name in labels.items()}.get(
        options.baseline, options.baseline
    )
    if options.predictions is not None and options.model:
        raise DeltakdError("give either --model or --predictions, not both")
    lock = None
    if options.out is not None and not options.overwrite:
        done = finished_report(options)
        if done is not None:  # as every stage: complete, identical work is not redone
            info(f"[green]{options.out} already holds this eval[/green] (the same options, data "
                 "and models); nothing to do")  # fmt: skip
            return done
    if options.out is not None:
        inputs = [("--data", options.data), ("--predictions", options.predictions)]
        inputs += [("--model", spec) for spec in models]
        report_files.prepare_output(options.out, inputs, options.overwrite)
        if distributed.is_main_process():
            what = f"eval report {options.out}"
            lock = outputs.file_lock(outputs.local_path(options.out), what).acquire()
    succeeded = False
    try:
        if options.predictions is not None:
            report, records = evaluate_predictions(
                options.predictions,
                options.data_source(options.data),
                limit=options.limit,
                baseline=baseline,
                template=options.template,
                groups_text=group_text,
                compare_text=options.compare,
                columns=columns_of(options),
            )
        else:
            groups = parse_groups(group_text, models)
            comparisons = parse_comparisons(options.compare, groups, models)
            protocol = make_protocol(
                options.protocol,
                seeds=options.seeds,
                max_new_tokens=options.max_new_tokens,
                max_prompt_length=options.max_prompt_length,
                batch_size=options.batch_size,
                template=options.template,
            )
            options.load_settings().check()
            report, records = evaluate_models(
                models,
                options.data_source(options.data),
                protocol,
                limit=options.limit,
                baseline=baseline,
                device=options.device,
                dtype=options.dtype,
                groups=groups,
                comparisons=comparisons,
                columns=columns_of(options),
                load=options.load_settings(),
                template_from=options.template_from,
            )
        # The options the eval ran with: the report reads back as a config (--config REPORT.json).
        report = {**report, "labels": labels, "command": "eval", "options": recorded(options),
                  "paths": PATHS_ARE}  # fmt: skip
        report["models"] = [{**model, "label": labels.get(model["name"])}
                            for model in report["models"]]  # fmt: skip
        if distributed.is_main_process():  # under torchrun, rank 0 reports and writes
            if options.json:
                print(json.dumps(report, indent=2, default=str))
            else:
                for table in report_files.report_tables(report):
                    Console(quiet=console.quiet).print(table)  # stdout; quiet as the console
            if options.out is None:
                info("not saved: add --out REPORT.json to keep the report and every generation")
            else:
                paths = report_files.write_outputs(report, records, options.out)
                info(f"wrote {paths[0]} and {paths[1]}")
        succeeded = True
        return report
    except KeyboardInterrupt:
        raise Interrupted("eval stopped; rerun the same command (it starts over)") from None
    finally:
        if lock is not None:
            lock.release()
        distributed.shutdown(clean=succeeded)
