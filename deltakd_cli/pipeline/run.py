"""`deltakd pipeline`: every stage of plan.py in order (each skipped when already done), then
the table. OUT is held for the whole run (a lock, and it must be a pipeline's directory)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deltakd_cli import __version__, outputs
from deltakd_cli.errors import DeltakdError
from deltakd_cli.options import record
from deltakd_cli.pipeline.options import PipelineOptions
from deltakd_cli.pipeline.plan import check_inputs, plan_stages
from deltakd_cli.pipeline.results import print_results, results_table
from deltakd_cli.pipeline.stages import Runner, run_stage

PIPELINE_NAMES = ("summary.json", "models", "cache", "eval", "init-student")


@contextmanager
def pipeline_output(out: Path) -> Iterator[None]:
    """Hold OUT for one pipeline (or demo) run: a lock for the whole run, and OUT must be a
    pipeline's directory (or new, or empty)."""
    if out.exists() and not out.is_dir():
        raise DeltakdError(f"--out {out} exists and is not a directory")
    with outputs.directory_lock(out, f"pipeline directory {out}"):
        outputs.claim_directory(
            out, "pipeline", "pipeline directory", overwrite=False, legacy=PIPELINE_NAMES
        )
        yield


def pipeline(options: PipelineOptions, runner: Runner) -> dict[str, Any]:
    """`deltakd pipeline`: every stage in OUT, locked for the run."""
    check_inputs(options)
    with pipeline_output(options.out_path):
        return run_pipeline(options, runner)


def run_pipeline(
    options: PipelineOptions, runner: Runner, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run (or skip) every stage, print the table, write OUT/summary.json (OUT already held:
    see `pipeline_output`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_inputs(options)
    stages, roles = plan_stages(options)
    options.out_path.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records = {stage.name: run_stage(stage, runner, options.nproc) for stage in stages}
    report_path = stages[-1].out / "report.json"
    report = json.loads(report_path.read_text())
    summary = {
        "tool": "deltakd",
        "version": __version__,
        "command": "pipeline",
        "options": record(options),  # summary.json reads back as a config
        "roles": roles,
        "stages": records,
        "pipeline_seconds": round(time.perf_counter() - started, 1),
        "protocol": report.get("protocol"),
        "results": results_table(report),
        "report": str(report_path),
        **(extra or {}),
    }
    summary_path = options.out_path / "summary.json"
    outputs.atomic_write_text(summary_path, json.dumps(summary, indent=2, default=str) + "\n")
    print_results(summary, summary_path)
    return summary
