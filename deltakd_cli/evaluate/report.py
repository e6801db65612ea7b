"""The report an eval writes: one record per (model, seed, row), the report JSON assembled from
them (scores, spread, paired differences), the files (REPORT.json and
REPORT.generations.jsonl, each whole or not at all) and the tables printed."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deltakd_cli import __version__, outputs, sources
from deltakd_cli.data import Example
from deltakd_cli.errors import DeltakdError
from deltakd_cli.evaluate import rouge, stats
from deltakd_cli.outputs import local_path


def make_record(
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


def assemble(
    mode: str,
    data_path: Any,
    examples: Sequence[Example],
    limit: int | None,
    records: list[dict[str, Any]],
    model_order: Sequence[str],
    baseline: str,
    extra: dict[str, Any],
    groups: dict[str, list[str]] | None = None,
    comparisons: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """The report from the scored records (grouped by model, then seed, rows in data order).
    With `groups` (name -> models), each group gets a ROUGE-L line and `comparisons` (first,
    second) of groups their paired differences; a model in no group is a group of its own."""
    summaries = []
    row_means: dict[str, list[dict[str, float]]] = {}
    for name in model_order:
        scores_by_seed: dict[int | None, list] = {}
        for record in records:
            if record["model"] == name:
                scores_by_seed.setdefault(record["seed"], [None] * len(examples))
                scores_by_seed[record["seed"]][record["row"]] = record
        summary, row_means[name] = stats.summarize_model(name, scores_by_seed)
        summaries.append(summary)
    group_lines, group_differences = _groups(summaries, row_means, groups or {}, comparisons)
    return {
        "tool": {"name": "deltakd", "version": __version__},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "data": {
            "spec": getattr(data_path, "spec", str(data_path)),
            **sources.fingerprint(
                data_path
                if isinstance(data_path, sources.DataSource)
                else sources.DataSource(str(data_path))
            ),
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
            "n_resamples": stats.BOOTSTRAP_RESAMPLES,
            "seed": stats.BOOTSTRAP_SEED,
            "confidence": stats.BOOTSTRAP_CONFIDENCE,
        },
        "differences": stats.compare_to_baseline(baseline, row_means),
        "groups": group_lines,
        "group_differences": group_differences,
    }


def _groups(
    summaries: list[dict[str, Any]],
    row_means: dict[str, list[dict[str, float]]],
    groups: dict[str, list[str]],
    comparisons: Sequence[tuple[str, str]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """ROUGE-L per group and the asked-for paired differences between groups."""
    if not groups and not comparisons:
        return [], []
    by_name = {summary["name"]: summary for summary in summaries}
    grouped = {model for models in groups.values() for model in models}
    every = dict(groups)
    every.update({name: [name] for name in by_name if name not in grouped})
    lines = {
        name: stats.summarize_group(name, [by_name[model] for model in models])
        for name, models in every.items()
    }
    rows = {name: stats.group_row_means(row_means, models) for name, models in every.items()}
    differences = [
        stats.compare_groups(lines[first], lines[second], rows[first], rows[second])
        for first, second in comparisons
    ]
    ordered = [lines[name] for name in groups] if groups else list(lines.values())
    return ordered, differences


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


CLAIM_KIND = "eval-report"  # the claim's kind (outputs.marker_text)


def claim_path(report_path: str | Path) -> Path:
    """REPORT.json -> REPORT.json.deltakd-output.json: the claim an eval writes before its first
    output and removes after REPORT.json is whole. While it is there the eval is unfinished, and
    the files it lists are deltakd's (outputs.marker_text: kind "eval-report"), so an
    interrupted eval (Ctrl-C, SIGTERM, a full disk between the two files) reruns."""
    report_path = Path(report_path)
    return report_path.with_name(report_path.name + outputs.MARKER)


def _claimed_eval_files(report_path: Path) -> set[str] | None:
    """The names an unfinished eval's claim lists; None when there is no claim, and refused
    when a file of the claim's name is not deltakd's (it is the user's, never written over)."""
    claim = claim_path(report_path)
    if not (claim.exists() or claim.is_symlink()):
        return None
    try:
        marker = outputs.parse_marker(claim.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        marker = None
    if marker is None or marker.get("kind") != CLAIM_KIND:
        raise DeltakdError(
            f"{claim} already exists and is not an eval output deltakd wrote; deltakd never "
            "replaces it (--overwrite neither): choose another --out"
        )
    return {name for name in marker.get("files", []) if isinstance(name, str)}


def _own_eval_files(report_path: Path) -> set[str]:
    """The names of REPORT and its generations file that a deltakd eval wrote, proved by the
    report itself (a deltakd report naming its generations file)."""
    if not _is_report(report_path):
        return set()
    report = json.loads(report_path.read_text(encoding="utf-8"))
    named = report.get("generations_file")
    own = {report_path.name}
    if named == generations_path(report_path).name:
        own.add(named)
    return own


def prepare_output(
    report_path: str | Path,
    inputs: dict[str, Any] | Sequence[tuple[str, Any]] = (),
    overwrite: bool = False,
) -> Path:
    """Check the report can be written before any work: not a directory, not an input (nor
    its generations file), not an existing report unless --overwrite; its folder is created.
    The files of an unfinished eval (its claim is there: `claim_path`) are deltakd's, and the
    rerun starts over: their generations file is replaced without --overwrite (a whole report
    of an earlier run still needs it)."""
    report_path = Path(local_path(report_path))
    if report_path.is_dir():
        raise DeltakdError(f"--out {report_path} is a directory; give a file name like report.json")
    for path in (report_path, generations_path(report_path), claim_path(report_path)):
        outputs.check_not_input(path, inputs)
    claimed = _claimed_eval_files(report_path)
    owned = _own_eval_files(report_path) | (claimed or set())
    for path in (report_path, generations_path(report_path)):
        if not (path.exists() or path.is_symlink()):
            continue
        if path.name not in owned:  # ownership by proof: a file deltakd did not write stays
            raise DeltakdError(
                f"{path} already exists and is not an eval output deltakd wrote; deltakd never "
                "replaces it (--overwrite neither): choose another --out"
            )
        unfinished = claimed is not None and path != report_path  # a report is whole, or absent
        if not overwrite and not unfinished:
            raise DeltakdError(
                f"{path} already exists (an eval report of an earlier run); choose another "
                "--out, or pass --overwrite to replace it"
            )
    with outputs.writing(report_path.parent):
        report_path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(report_path.parent, os.W_OK):
        raise DeltakdError(f"cannot write to {report_path.parent}")
    return report_path


def write_outputs(
    report: dict[str, Any], records: Sequence[dict[str, Any]], report_path: str | Path
) -> tuple[Path, Path]:
    """Claim both files (`claim_path`), write REPORT.generations.jsonl, then REPORT.json (each
    whole or not at all; the report last, so a report never points at generations that are not
    there), then drop the claim: the whole report proves its own files from then on."""
    report_path = Path(local_path(report_path))
    records_path = generations_path(report_path)
    claim = claim_path(report_path)
    report = {**report, "generations_file": records_path.name}
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    outputs.atomic_write_text(
        claim, outputs.marker_text(CLAIM_KIND, [report_path.name, records_path.name])
    )
    outputs.atomic_write_text(records_path, lines)
    outputs.atomic_write_text(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    claim.unlink(missing_ok=True)
    return report_path, records_path


# How each template renders a prompt, in the protocol line.
TEMPLATE_WORDS = {
    "alpaca": "Alpaca prompt",
    "chat": "each model's chat template",
    "plain": "plain prompt (no template)",
}


def protocol_line(protocol: dict[str, Any] | None, rows: int) -> str:
    """The protocol as the eval recorded it: decoding (and its seeds), rows, the template the
    prompts were rendered with, how they were cut, the new-token limit, and whether these are
    the published settings. Read from the report, never assumed."""
    if not protocol:
        return "scored from predictions"
    seeds = protocol.get("seeds") or []
    if protocol["do_sample"]:
        top_k = protocol.get("top_k")
        how = (
            f"sampling T={protocol['temperature']}, top_p {protocol['top_p']}, "
            + (f"top_k {top_k}" if top_k else "no top-k")
            + f", seeds {','.join(map(str, seeds))}"
        )
    else:
        how = "greedy decoding (one deterministic run)"
    published = (
        "the published MiniLLM/DistiLLM protocol"
        if protocol.get("matches_published_protocol")
        else "NOT the published protocol"
    )
    template = protocol.get("template", "alpaca")
    prompt = TEMPLATE_WORDS.get(template, f"template {template}")
    if protocol.get("template_from"):
        from deltakd_cli.outputs import public_name  # a local path by its last part only

        source = public_name(protocol["template_from"])
        if template == "chat":
            prompt = f"the chat template of {source}"
        else:  # the template's text, tokenised by (and ending on the EOS of) that model
            prompt = f"{prompt} in the tokenizer of {source}"
    side = str(protocol.get("prompt_truncation") or "left").split()[0]
    return (
        f"protocol {protocol['name']}: {how}, {rows} rows, {prompt} cut from the {side} to "
        f"{protocol['max_prompt_length']} tokens, up to {protocol['max_new_tokens']} new tokens; "
        f"ROUGE-L F x100 (rouge_score, stemmed) - {published}"
    )


def _cell(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def report_tables(report: dict[str, Any]) -> list[Any]:
    """Rich tables: model x metric (mean ± std over seeds), and ROUGE-L differences from the
    baseline with their bootstrap intervals. A model given as NAME=MODEL is shown as NAME."""
    from rich.table import Table

    labels = report.get("labels") or {}
    names = [summary["name"] for summary in report["models"]]
    # A path is shown by its last part when that tells the models apart (a path in a cell
    # wraps mid-name in a log); the paths follow in the caption.
    last = [Path(name).name or name for name in names]
    short = dict(zip(names, last, strict=True)) if len(set(last)) == len(last) else {}

    def shown(model: str) -> str:
        return labels.get(model) or short.get(model, model)

    protocol = report.get("protocol")
    caption = (
        f"protocol {protocol['name']}, {len(protocol['seeds']) or 1} run(s) per model"
        if protocol
        else f"scored from {Path(report['predictions']['path']).name}"
    )
    caption += "".join(f"\n{shown(n)}: {n}" for n in names if shown(n) != n)
    scores = Table(
        title=f"{Path(report['data']['spec']).name}: {report['data']['rows']} rows",
        caption=caption,
    )
    scores.add_column("model", no_wrap=True)
    for metric in rouge.METRICS:
        scores.add_column(rouge.METRIC_LABELS[metric], justify="right")
    scores.add_column("runs", justify="right")
    for summary in report["models"]:
        cells = [_cell(summary["mean"][m], summary["std"][m]) for m in rouge.METRICS]
        scores.add_row(shown(summary["name"]), *cells, str(summary["n_seeds"]))
    tables = [scores]
    rouge_l = [d for d in report["differences"] if d["metric"] == "rougeL"]
    if rouge_l:
        confidence = round(100 * report["bootstrap"]["confidence"])
        baseline = shown(report["baseline"])
        diffs = Table(title=f"ROUGE-L difference from {baseline} (paired bootstrap)")
        diffs.add_column("model", no_wrap=True)
        diffs.add_column("difference", justify="right")
        diffs.add_column(f"{confidence}% interval", justify="right")
        diffs.add_column("beyond noise", justify="center")
        for entry in rouge_l:
            diffs.add_row(
                shown(entry["model"]),
                f"{entry['difference']:+.2f}",
                f"[{entry['ci_low']:+.2f}, {entry['ci_high']:+.2f}]",
                "yes" if stats.read_difference(entry)["beyond_noise"] else "no",
            )
        tables.append(diffs)
    return tables
