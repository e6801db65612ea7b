"""The options of `deltakd report`, written once (options.py derives the command line, the checks
and the record from them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deltakd_cli.options import opt


@dataclass(kw_only=True)
class ReportOptions:
    """Plots and tables of training runs, eval reports and pipeline directories: loss curves,
    ROUGE-L per model, paired differences, as REPORT/index.html with the numbers as CSV."""

    command: ClassVar[str] = "report"

    dirs: list[str] = opt(
        help="Training run directories (run.json, metrics.jsonl), eval reports (REPORT.json) or "
        "pipeline directories (summary.json), in any mix.",
        argument=True,
        metavar="DIR",
        local="input folder",
    )
    out: str = opt(
        help="Output directory: index.html, the PNGs and the numbers behind them.",
        local="output folder",
    )
    overwrite: bool = opt(
        False, help="Write into a non-empty directory that is not a deltakd report."
    )
