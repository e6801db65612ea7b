"""`deltakd report DIR... --out REPORT/`: read every DIR (collect.py), draw the plots
(plots.py), write the numbers behind each plot as CSV and index.html (page.py) into REPORT/.

REPORT/ is a deltakd output of kind "report" (outputs.py): never an input nor inside one, locked
while written, a non-empty directory that is not a report refused unless --overwrite. Running
again into our own report replaces it: the files the last report wrote are removed first (so a
plot that no longer applies does not linger), anything else in the directory stays."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from rich.markup import escape

from deltakd_cli import outputs
from deltakd_cli.console import info
from deltakd_cli.errors import DeltakdError
from deltakd_cli.options import check
from deltakd_cli.report import collect, page, plots
from deltakd_cli.report.collect import Collected, Evaluation, Run, Sweep
from deltakd_cli.report.options import ReportOptions

KIND = "report"
INDEX = "index.html"


# ----------------------------------------------------------------------------- the numbers


def _number(value: float | int | None) -> str:
    """Exactly the value (repr round-trips a float), or empty for none."""
    return "" if value is None else repr(value)


def _points(values: list[float]) -> str:
    return ";".join(repr(value) for value in values)


def _csv(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def loss_csv(runs: list[Run]) -> str:
    """run, step, loss, eval_loss: one row per logged step of each run (what loss.png draws)."""
    rows = [
        [run.label, str(point.step), _number(point.loss), _number(point.eval_loss)]
        for run in runs
        for point in run.points
    ]
    return _csv(["run", "step", "loss", "eval_loss"], rows)


def rouge_csv(evaluations: list[Evaluation]) -> str:
    """One row per model or group of each report (what rougeL.png draws); `points` are the
    per-seed or per-model scores, separated by ';'."""
    header = ["source", "label", "name", "mean", "std", "spread", "runs", "rows", "points",
              "points_are"]  # fmt: skip
    rows = [
        [
            evaluation.source,
            score.label,
            score.name,
            _number(score.mean),
            _number(score.std),
            score.spread or "",
            str(score.runs),
            str(score.rows),
            _points(score.points),
            score.points_are or "",
        ]  # fmt: skip
        for evaluation in evaluations
        for score in evaluation.scores
    ]
    return _csv(header, rows)


def differences_csv(evaluations: list[Evaluation]) -> str:
    """One row per paired difference (what differences.png draws); `points` are the per-seed or
    per-model differences, separated by ';'."""
    header = ["source", "label", "model", "minus", "difference", "ci_low", "ci_high",
              "confidence", "beyond_noise", "points", "points_are"]  # fmt: skip
    rows = [
        [
            evaluation.source,
            entry.label,
            entry.model,
            entry.minus,
            _number(entry.difference),
            _number(entry.ci_low),
            _number(entry.ci_high),
            _number(entry.confidence),
            "yes" if entry.beyond_noise else "no",
            _points(entry.points),
            entry.points_are or "",
        ]  # fmt: skip
        for evaluation in evaluations
        for entry in evaluation.differences
    ]
    return _csv(header, rows)


def sweep_csv(sweeps: list[Sweep]) -> str:
    """One row per point of each sweep (what sweep.png draws)."""
    header = ["source", "role", "label", "gamma", "alpha", "validation", "test_mean", "test_std",
              "test_points", "minus_sft", "ci_low", "ci_high", "chosen"]  # fmt: skip
    rows = []
    for sweep in sweeps:
        for point in sweep.points:
            versus = point.versus_sft
            rows.append(
                [
                    sweep.source, point.role, point.label, _number(point.gamma),
                    _number(point.alpha), _number(point.validation), _number(point.test.mean),
                    _number(point.test.std), _points(point.test.points),
                    _number(versus.difference if versus else None),
                    _number(versus.ci_low if versus else None),
                    _number(versus.ci_high if versus else None),
                    "yes" if point.chosen else "no",
                ]
            )  # fmt: skip
    return _csv(header, rows)


# ----------------------------------------------------------------------------- the report


def _write(collected: Collected, out: Path) -> set[str]:
    """Every figure with its numbers, then index.html; returns the names written."""
    figures = []
    texts: dict[str, str] = {}
    if collected.runs:
        figures.append(("loss.png", plots.loss_figure(collected.runs)))
        for note in plots.undrawable(collected.runs):
            info(f"note: {escape(note)}")
        texts["loss.csv"] = loss_csv(collected.runs)
    if collected.evaluations:
        figures.append(("rougeL.png", plots.rouge_figure(collected.evaluations)))
        texts["rougeL.csv"] = rouge_csv(collected.evaluations)
        figures.append(("differences.png", plots.differences_figure(collected.evaluations)))
        if any(evaluation.differences for evaluation in collected.evaluations):
            texts["differences.csv"] = differences_csv(collected.evaluations)
    if collected.sweeps:
        figures.append(("sweep.png", plots.sweep_figure(collected.sweeps)))
        texts["sweep.csv"] = sweep_csv(collected.sweeps)
    figures = [(name, figure) for name, figure in figures if figure is not None]
    names = {name for name, _ in figures} | set(texts)
    texts[INDEX] = page.render(collected, names)
    names.add(INDEX)
    outputs.add_marker_files(out, names)  # recorded before they arrive: a rerun removes them
    for name, figure in figures:
        plots.save_png(figure, out / name)
    for name, text in texts.items():
        outputs.atomic_write_text(out / name, text)
    return names


def write_report(
    dirs: list[Path], out: Path, overwrite: bool = False, own_subdirectory: bool = False
) -> Path:
    """Read `dirs`, write the report into `out` (see the module's docstring); returns the path
    of index.html. The pipeline calls this at its end with `own_subdirectory`: OUT/report is
    inside the pipeline directory it reads, which is allowed there because nothing the report
    reads lives under report/."""
    plots.require_matplotlib()
    out = Path(outputs.local_path(out))
    sources = [str(directory) for directory in dirs]
    dirs = [Path(outputs.local_path(directory)) for directory in dirs]
    for directory in dirs:
        if own_subdirectory and out.parent.resolve() == directory.resolve():
            continue
        outputs.check_not_input(out, {"DIR": directory})
    collected = collect.collect(dirs, sources)
    if out.exists() and not out.is_dir():
        raise DeltakdError(f"--out {out} exists and is not a directory")
    with outputs.directory_lock(out, f"report directory {out}"):
        state = outputs.claim_directory(out, KIND, "report directory", overwrite)
        if state == "ours":  # our own earlier report: replaced, nothing else touched
            earlier = outputs.read_marker(out) or {}
            outputs.remove_own_files(out, earlier.get("files", []))
            outputs.write_marker(out, KIND)
        import matplotlib

        # Labels are data (run directories named with `$`): never parsed as mathtext.
        with matplotlib.rc_context({"text.parse_math": False}):
            _write(collected, out)
    index = out / INDEX
    info(f"report: {escape(str(index))}")
    return index


def make_report(options: ReportOptions) -> Path:
    """`deltakd report`."""
    check(options)
    if not options.dirs:
        raise DeltakdError("give at least one DIR to report on")
    return write_report(list(map(Path, options.dirs)), Path(options.out), options.overwrite)
