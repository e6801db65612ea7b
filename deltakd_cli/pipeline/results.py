"""The pipeline's answer: ROUGE-L per role (a student's training seeds folded into one line)
and the paired differences that answer "does Delta-KD help?", taken from the eval report
(eval computes every number; this module only labels and prints them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deltakd_cli.console import console
from deltakd_cli.evaluate.report import protocol_line
from deltakd_cli.evaluate.stats import read_difference
from deltakd_cli.pipeline.plan import ROLE_LABELS


def results_table(report: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The table's rows (one per role, from the report's groups) and comparisons (from its group
    differences). A role trained with several seeds shows the mean of its models and their
    standard deviation over training seeds; a single model its eval seeds' std, or none for one
    deterministic run."""
    lines = {line["name"]: line for line in report["groups"]}
    rows = []
    for role, label in (labels or ROLE_LABELS).items():
        line = lines[role]
        spread = {"models": "training seeds"}.get(line["spread"], line["spread"])
        rows.append(
            {
                "role": role,
                "label": label,
                "models": line["models"],
                "rougeL": line["mean"],
                "rougeL_std": line["std"],
                "spread": spread,
                "per_model": line["per_model"],
                "runs": line["runs"],
                "rows": line["rows"],
            }
        )
    comparisons = [read_difference(entry) for entry in report["group_differences"]]
    return {"rows": rows, "comparisons": comparisons}


def _directories(models: list[str], root: Path) -> str:
    """Models as paths relative to `root` (the run's models/) when inside it; a role's seeds
    folded into one (student-kd-seed{0,1,2})."""
    names = []
    for model in models:
        try:
            names.append(str(Path(model).relative_to(root)))
        except ValueError:
            names.append(model)
    if len(names) == 1:
        return names[0]
    prefix = os.path.commonprefix(names)
    return prefix + "{" + ",".join(name[len(prefix) :] for name in names) + "}"


def labels_of(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {row["role"]: row["label"] for row in rows}


def print_results(summary: dict[str, Any], summary_path: Path) -> None:
    from rich.table import Table

    results = summary["results"]
    rows = results["rows"]
    sweep = summary.get("sweep")
    title = "Does Delta-KD help here?" if not sweep else "How much of Delta-KD helps here?"
    table = Table(title=f"{title} ROUGE-L on the held-out split")
    table.add_column("model")
    table.add_column("ROUGE-L", justify="right")
    table.add_column("± std over")
    out = Path(summary["options"]["out"])
    table.add_column("directory", overflow="fold")
    table.caption = f"relative directories are in {out / 'models'}/"
    for row in rows:
        std = row["rougeL_std"]
        cell = f"{row['rougeL']:.2f}" + (f" ± {std:.2f}" if std is not None else "")
        spread = row.get("spread")
        if spread == "training seeds":
            spread = f"{len(row['models'])} training seeds"
        elif spread == "eval seeds":
            spread = f"{row['runs']} eval seeds"
        where = _directories(row["models"], out / "models")
        label = row["label"] + (" [bold]← chosen[/bold]" if row.get("chosen") else "")
        table.add_row(label, cell, spread or "-", where)
    console.print(table)
    if sweep:
        scores = ", ".join(
            f"{labels_of(rows)[role]} {score:.2f}" for role, score in sweep["validation"].items()
        )
        console.print(
            f"the sweep's point was chosen on {sweep['validation_rows']} held-out training rows "
            f"(never the test rows): {scores}"
        )
    console.print(protocol_line(summary.get("protocol"), rows[0]["rows"]))
    labels = {row["role"]: row["label"] for row in rows}
    for entry in results["comparisons"]:
        verdict = "beyond noise" if entry["beyond_noise"] else "within noise"
        console.print(
            f"  {labels[entry['model']]} - {labels[entry['minus']]}: "
            f"{entry['difference']:+.2f} ROUGE-L, 95% CI [{entry['ci_low']:+.2f}, "
            f"{entry['ci_high']:+.2f}] (paired bootstrap over rows): {verdict}"
        )
        if entry.get("per_model_differences"):
            per_seed = ", ".join(f"{d:+.2f}" for d in entry["per_model_differences"])
            console.print(f"    per training seed: {per_seed}")
    console.print(f"\n[bold]written under {out}/[/bold]")
    made = (
        sorted(p.name for p in (out / "models").iterdir() if p.is_dir())
        if (out / "models").is_dir()
        else []
    )
    lines = []
    if made:
        lines.append(f"models/       {', '.join(made)} (Hugging Face directories)")
    if (out / "init-student").is_dir():
        lines.append("init-student/ the pruned copy as copied, the healing cache and run")
    lines += [
        "cache/        the teachers' cache (deltakd inspect cache)",
        "eval/         report.json and report.generations.jsonl (every generation)",
        f"{summary_path.name}  this table, every stage's command and time, the settings",
    ]
    for line in lines:
        console.print(f"  {line}")
    skipped = [name for name, record in summary["stages"].items() if record.get("skipped")]
    if skipped:
        console.print(f"  (reused from an earlier run: {', '.join(skipped)})")
    console.print("stages (wall time, peak resident memory):")
    for line in stage_lines(summary["stages"]):
        console.print(f"  {line}")


def stage_lines(records: dict[str, dict[str, Any]]) -> list[str]:
    """One line per stage: its time and peak RSS (as recorded when it ran, for a reused one)."""
    lines = []
    width = max((len(name) for name in records), default=0)
    for name, record in records.items():
        peak = record.get("peak_rss_mib")
        memory = f"peak RSS {peak:,} MiB" if peak is not None else "peak RSS not recorded"
        if record.get("children_peak_rss_mib") is not None:
            memory += f" (worker processes {record['children_peak_rss_mib']:,} MiB)"
        reused = ", reused" if record.get("skipped") else ""
        seconds = record.get("seconds")
        took = f"{seconds:.1f}s" if seconds is not None else "-"
        lines.append(f"{name:{width}s} {took:>8s}  {memory}{reused}")
    return lines
