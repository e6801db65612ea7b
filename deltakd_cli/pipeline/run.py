"""`deltakd pipeline`: every stage of plan.py in order (each skipped when already done), then
the table. OUT is held for the whole run (a lock, and it must be a pipeline's directory)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deltakd_cli import __version__, outputs
from deltakd_cli.console import info
from deltakd_cli.errors import DeltakdError
from deltakd_cli.evaluate.report import protocol_line
from deltakd_cli.options import PATHS_ARE, absolute_paths, record
from deltakd_cli.pipeline.heldout import hold_out, resolve_eval_every, split_record
from deltakd_cli.pipeline.options import PipelineOptions
from deltakd_cli.pipeline.plan import (
    check_inputs,
    check_planned,
    check_stages,
    plan_stages,
    push_role,
    role_labels,
    sweep_roles,
    test_rows,
    validation_rows,
)
from deltakd_cli.pipeline.results import print_results, results_table
from deltakd_cli.pipeline.stages import Runner, Stage, run_stage
from deltakd_cli.pipeline.sweep import choose
from deltakd_cli.tracking import open_trackers, parse_report_to
from deltakd_cli.train.export import write_card
from deltakd_cli.train.hub import check_hub_access, push_folder

# Every entry a pipeline (or the demo) creates in OUT: listed in OUT's marker when OUT is
# claimed, the only entries a pipeline writes into.
PIPELINE_NAMES = (
    "summary.json", "models", "cache", "eval", "eval-validation", "init-student", "data",
    "cache-validation", "report", "runs", "wandb", "mlruns", "assets", "wheels",
)  # fmt: skip
# A stage's record sits beside its output (stages.py: `<output>.stage.json`).
PIPELINE_NAMES = (*PIPELINE_NAMES, *(f"{name}.stage.json" for name in PIPELINE_NAMES))


def recorded_pipeline_entries(out: Path) -> list[str] | None:
    """What a pipeline of an earlier deltakd (no output marker) created in OUT, as proved by
    its own record: summary.json written by deltakd pipeline or demo. None otherwise."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(summary, dict) or summary.get("tool") != "deltakd":
        return None
    if summary.get("command") != "pipeline":
        return None
    return [name for name in PIPELINE_NAMES if (out / name).exists()]


@contextmanager
def pipeline_output(out: Path) -> Iterator[None]:
    """Hold OUT for one pipeline (or demo) run: a lock for the whole run, and OUT must be a
    pipeline's directory (or new, or empty)."""
    if out.exists() and not out.is_dir():
        raise DeltakdError(f"--out {out} exists and is not a directory")
    with outputs.directory_lock(out, f"pipeline directory {out}"):
        outputs.claim_directory(
            out,
            "pipeline",
            "pipeline directory",
            overwrite=False,
            planned=PIPELINE_NAMES,
            recognise=recorded_pipeline_entries,
        )
        yield


def pipeline(options: PipelineOptions, runner: Runner) -> dict[str, Any]:
    """`deltakd pipeline`: every stage in OUT, locked for the run."""
    check_inputs(options)
    check_stages(options)  # every stage's options, before the first stage (and before OUT)
    if options.push_to_hub:  # before the first stage: offline, the token, the repository
        offline_by_caller = "HF_HUB_OFFLINE" in os.environ
        check_hub_access(options.push_to_hub, "--push-to-hub", go_online=not offline_by_caller)
    with pipeline_output(options.out_path):
        return run_pipeline(options, runner)


def run_pipeline(
    options: PipelineOptions, runner: Runner, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run (or skip) every stage, print the table, write OUT/summary.json (OUT already held:
    see `pipeline_output`)."""
    offline_by_caller = "HF_HUB_OFFLINE" in os.environ  # a push never overrides theirs
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_inputs(options)
    options.out_path.mkdir(parents=True, exist_ok=True)
    held_out = hold_out(options)
    if held_out:
        options = dataclasses.replace(options, held_out=held_out)
    options = dataclasses.replace(options, eval_every=resolve_eval_every(options))
    stages, roles = plan_stages(options)
    check_planned(stages)  # the stages as they will run (the demo comes in here)
    started = time.perf_counter()
    # Every stage's output goes where the pipeline's own goes, stderr: eval prints its tables
    # to stdout when run alone; the pipeline prints its table at the end.
    with contextlib.redirect_stdout(sys.stderr):
        records = {stage.name: run_stage(stage, runner, options.nproc) for stage in stages}
    report_path = stages[-1].out / "report.json"
    report = json.loads(report_path.read_text())
    results = results_table(report, role_labels(options))
    sweep = chosen_on_validation(options, results)
    summary = {
        "tool": "deltakd",
        "version": __version__,
        "command": "pipeline",
        # summary.json reads back as a config, from any directory
        "options": absolute_paths(record(options), PipelineOptions),
        "paths": PATHS_ARE,
        "roles": roles,
        "held_out": {
            "validation": validation_rows(options),
            "test": test_rows(options)["data"],
            "split": held_out or None,
            # What OUT/data/split.json records: the test split's seed, size, row numbers, ids.
            "set_aside": split_record(options),
            "eval_every": options.eval_every,
        },
        "stages": records,
        "pipeline_seconds": round(time.perf_counter() - started, 1),
        "protocol": report.get("protocol"),
        "results": results,
        "report": str(report_path),
        **({"sweep": sweep} if sweep else {}),
        **(extra or {}),
    }
    write_model_cards(stages, report, report_path)
    log_results(options, results)
    summary_path = options.out_path / "summary.json"
    outputs.atomic_write_text(summary_path, json.dumps(summary, indent=2, default=str) + "\n")
    summary["report_html"] = write_pipeline_report(options.out_path)
    outputs.atomic_write_text(summary_path, json.dumps(summary, indent=2, default=str) + "\n")
    print_results(summary, summary_path)
    if options.push_to_hub:
        push_student(options, roles, sweep, go_online=not offline_by_caller)
    return summary


def push_student(
    options: PipelineOptions,
    roles: dict[str, list[str]],
    sweep: dict[str, Any] | None,
    go_online: bool,
) -> None:
    """--push-to-hub: upload the student of --push-role (default student-delta; with --sweep the
    point chosen on validation), its card holding the eval result; the first seed's model when
    it was trained with several."""
    role = push_role(options) or (sweep or {}).get("chosen")
    if role is None or not roles.get(role):
        raise DeltakdError("--push-to-hub: no trained student to push (give --push-role)")
    model = roles[role][0]
    info(f"--push-to-hub: the {role} student ({model})")
    push_folder(model, options.push_to_hub, private=options.hub_private, go_online=go_online)


def chosen_on_validation(options: PipelineOptions, results: dict[str, Any]) -> dict | None:
    """With --sweep: the point chosen on the held-out training rows (their eval report only),
    marked in the results' rows."""
    swept = sweep_roles(options)
    if not swept:
        return None
    path = options.out_path / "eval-validation" / "report.json"
    validation = json.loads(path.read_text())
    chosen = choose(validation["groups"], swept)
    for row in results["rows"]:
        row["chosen"] = row["role"] == chosen
    means = {line["name"]: line["mean"] for line in validation["groups"]}
    return {
        "points": {role: {"gamma": p.gamma, "alpha": p.alpha} for role, p in swept.items()},
        "validation": {role: means[role] for role in swept},
        "validation_rows": validation["groups"][0]["rows"],
        "validation_report": str(path),
        "chosen": chosen,
        "rule": "the highest mean ROUGE-L on the held-out training rows; ties: grid order",
    }


def write_model_cards(stages: list[Stage], report: dict[str, Any], report_path: Path) -> None:
    """Every model the pipeline trained gets its eval result in its model card."""
    by_name = {model["name"]: model for model in report.get("models", [])}
    for stage in stages:
        model = by_name.get(str(stage.out))
        if stage.command not in ("distill", "finetune") or model is None:
            continue
        run_record = json.loads((stage.out / "run.json").read_text())
        evaluation = {
            "rouge_l": model["mean"]["rougeL"],
            "std": model["std"].get("rougeL"),
            "rows": model["n_rows"],
            "protocol": protocol_line(report.get("protocol"), model["n_rows"]),
            "report": str(report_path),
            "data": report.get("data"),  # the held-out rows (the card names them, no path)
        }
        write_card(stage.out, run_record, evaluation)


def log_results(options: PipelineOptions, results: dict[str, Any]) -> None:
    """The table's ROUGE-L per role (and the paired differences) to the --report-to trackers,
    as one run of their own next to the training runs."""
    if parse_report_to(options.report_to) == []:
        return
    trackers = open_trackers(
        options.report_to,
        options.out_path,
        f"{options.out_path.resolve().name}-eval",
        record(options),
        job_type="eval",
    )
    metrics = {f"eval/rougeL/{row['role']}": row["rougeL"] for row in results["rows"]}
    for entry in results["comparisons"]:
        name = f"{entry['model']}-minus-{entry['minus']}"
        metrics[f"eval/rougeL_difference/{name}"] = entry["difference"]
    trackers.log_metrics(metrics, step=0)
    trackers.close()


def write_pipeline_report(out: Path) -> str | None:
    """OUT/report/index.html (loss curves, ROUGE-L, paired differences), or a note when the
    `report` extra is missing: the pipeline's results stand without it."""
    from deltakd_cli.report.run import write_report

    try:
        return str(write_report([out], out / "report", own_subdirectory=True))
    except DeltakdError as error:
        info(f"[yellow]note:[/yellow] no report written: {error}")
        return None
