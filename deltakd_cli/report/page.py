"""REPORT/index.html: one plain page (no script, nothing fetched) with the plots, the tables, the
protocol and the commands that made the runs. Every text is escaped."""

from __future__ import annotations

from html import escape

from deltakd_cli import __version__
from deltakd_cli.report.collect import Collected, Difference, Evaluation, Run, Score, Sweep

STYLE = """
body { font-family: sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 0.5rem; overflow-x: auto; white-space: pre-wrap; }
.note { color: #555; font-size: 0.9rem; }
"""


def score_cell(score: Score) -> str:
    """ROUGE-L as the tables show it: `27.46 ± 0.98`, or `26.76` for one run."""
    if score.std is None:
        return f"{score.mean:.2f}"
    return f"{score.mean:.2f} ± {score.std:.2f}"


def spread_cell(score: Score) -> str:
    if score.spread is None:
        return "-"
    if score.spread == "eval seeds":
        return f"{score.runs} eval seeds"
    if score.spread in ("training seeds", "models"):
        count = len(score.points) or score.runs
        return f"{count} {score.spread}"
    return score.spread


def difference_cell(entry: Difference) -> str:
    return f"{entry.difference:+.2f}"


def interval_cell(entry: Difference) -> str:
    return f"[{entry.ci_low:+.2f}, {entry.ci_high:+.2f}]"


def points_cell(points: list[float]) -> str:
    """Per-seed or per-model differences: `+1.20, -0.35`."""
    return ", ".join(f"{value:+.2f}" for value in points) if points else "-"


def scores_cell(points: list[float]) -> str:
    """Per-seed or per-model scores: `27.10, 28.02`."""
    return ", ".join(f"{value:.2f}" for value in points) if points else "-"


def loss_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _row(cells: list[str], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    parts = [
        f'<td class="num">{escape(cell)}</td>' if index in numeric else f"<td>{escape(cell)}</td>"
        for index, cell in enumerate(cells)
    ]
    return "<tr>" + "".join(parts) + "</tr>"


def _table(headers: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{escape(header)}</th>" for header in headers)
    return f"<table>\n<tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>"


def _image(name: str, alt: str) -> str:
    return f'<p><img src="{escape(name)}" alt="{escape(alt)}"></p>'


def _data_link(names: list[str]) -> str:
    links = ", ".join(f'<a href="{escape(name)}">{escape(name)}</a>' for name in names)
    return f'<p class="note">The numbers behind the plot: {links}.</p>'


def _runs_section(runs: list[Run], files: set[str]) -> list[str]:
    parts = ["<h2>Training runs</h2>"]
    if "loss.png" in files:
        parts.append(_image("loss.png", "training and held-out loss against the step"))
        parts.append(_data_link(["loss.csv"]))
    rows = []
    for run in runs:
        training, held_out = run.training, run.held_out
        rows.append(
            _row(
                [
                    run.label,
                    str(run.path),
                    str(training[-1][0]) if training else "-",
                    loss_cell(training[-1][1] if training else None),
                    loss_cell(held_out[-1][1] if held_out else None),
                    "finished" if run.finished else "in progress (no run.json yet)",
                ],
                numeric={2, 3, 4},
            )
        )
    headers = ["run", "directory", "last step", "last loss", "last held-out loss", "state"]
    parts.append(_table(headers, rows))
    return parts


def _evaluation_section(evaluation: Evaluation) -> list[str]:
    parts = [f"<h3>{escape(evaluation.source)}</h3>"]
    parts.append(f'<p class="note">{escape(evaluation.protocol)}</p>')
    rows = [
        _row(
            [
                score.label,
                score_cell(score),
                spread_cell(score),
                str(score.runs),
                str(score.rows),
                scores_cell(score.points),
            ],
            numeric={1, 3, 4},
        )
        for score in evaluation.scores
    ]
    headers = ["model", "ROUGE-L", "± std over", "runs", "rows", "each seed / model"]
    parts.append(_table(headers, rows))
    parts.append(
        '<p class="note">The ± is the standard deviation over the seeds or models named, a '
        "spread, not a confidence interval; the intervals below are.</p>"
    )
    if evaluation.differences:
        confidence = round(100 * evaluation.confidence)
        what = (
            "the comparisons eval was asked for (--compare)"
            if evaluation.differences_are == "groups"
            else "each model minus the baseline"
        )
        parts.append(f"<p>Paired differences in ROUGE-L, {escape(what)}:</p>")
        rows = [
            _row(
                [
                    entry.label,
                    difference_cell(entry),
                    interval_cell(entry),
                    "yes" if entry.beyond_noise else "no",
                    points_cell(entry.points),
                ],
                numeric={1, 2},
            )
            for entry in evaluation.differences
        ]
        headers = [
            "comparison",
            "difference",
            f"{confidence}% interval",
            "beyond noise",
            "per seed / model",
        ]
        parts.append(_table(headers, rows))
        parts.append(
            f'<p class="note">{confidence}% paired percentile bootstrap over rows; "beyond noise" '
            "means the interval excludes 0.</p>"
        )
    return parts


def _sweep_section(sweeps: list[Sweep], files: set[str]) -> list[str]:
    parts = ["<h2>The KD-to-Delta sweep</h2>"]
    if "sweep.png" in files:
        parts.append(_image("sweep.png", "ROUGE-L against gamma, and each point minus SFT"))
        parts.append(_data_link(["sweep.csv"]))
    for sweep in sweeps:
        parts.append(
            f'<p class="note">{escape(sweep.source)}: the point was chosen on '
            f"{sweep.validation_rows} held-out training rows, never on the test rows.</p>"
        )
        rows = [
            _row(
                [
                    point.label + (" (chosen)" if point.chosen else ""),
                    f"{point.gamma:g}",
                    f"{point.alpha:g}",
                    f"{point.validation:.2f}",
                    score_cell(point.test),
                    difference_cell(point.versus_sft) if point.versus_sft else "",
                    interval_cell(point.versus_sft) if point.versus_sft else "",
                ],
                numeric={1, 2, 3, 4, 5},
            )
            for point in sweep.points
        ]
        headers = ["student", "gamma", "alpha", "validation ROUGE-L", "test ROUGE-L",
                   "minus SFT", "95% interval"]  # fmt: skip
        parts.append(_table(headers, rows))
    return parts


def render(collected: Collected, files: set[str]) -> str:
    """The page, given what was read and the names of the files written next to it."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        "<title>deltakd report</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        "<h1>deltakd report</h1>",
        "<p>Read from:</p>",
        "<ul>",
        *[f"<li>{escape(source)} ({escape(what)})</li>" for source, what in collected.sources],
        "</ul>",
    ]
    if collected.runs:
        parts += _runs_section(collected.runs, files)
    if collected.evaluations:
        parts.append("<h2>ROUGE-L</h2>")
        if "rougeL.png" in files:
            parts.append(_image("rougeL.png", "ROUGE-L per model with its spread"))
            parts.append(_data_link(["rougeL.csv"]))
        if "differences.png" in files:
            parts.append(_image("differences.png", "paired differences with their intervals"))
            parts.append(_data_link(["differences.csv"]))
        for evaluation in collected.evaluations:
            parts += _evaluation_section(evaluation)
    if collected.sweeps:
        parts += _sweep_section(collected.sweeps, files)
    if collected.commands:
        parts.append("<h2>Commands</h2>")
        for what, command in collected.commands:
            parts.append(f"<p>{escape(what)}</p>")
            parts.append(f"<pre>{escape(command)}</pre>")
    parts += [
        f'<p class="note">Made by deltakd {escape(__version__)} (deltakd report).</p>',
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"
