"""REPORT/index.html: one plain page (no script, nothing fetched) with the plots, the tables, the
protocol and the commands that made the runs. Every text is escaped."""

from __future__ import annotations

from html import escape
from typing import Any

from deltakd_cli import __version__
from deltakd_cli.report.collect import (
    CacheFacts,
    Collected,
    Difference,
    Evaluation,
    Run,
    Score,
    Sweep,
)

STYLE = """
body { font-family: sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 0.5rem; overflow-x: auto; white-space: pre-wrap; }
.note { color: #555; font-size: 0.9rem; }
ol.paths { color: #555; font-size: 0.85rem; word-break: break-all; }
td.text { white-space: pre-wrap; max-width: 28rem; }
"""


class Footnotes:
    """Paths out of the tables: a cell shows a short label and a number, the path is listed
    once under the table (a path in a cell wraps mid-name)."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def mark(self, label: str, path: str) -> str:
        """`label [n]`, or the label alone when it is the path."""
        if not path or path == label:
            return label
        if path not in self.paths:
            self.paths.append(path)
        return f"{label} [{self.paths.index(path) + 1}]"

    def html(self) -> str:
        if not self.paths:
            return ""
        items = "".join(f"<li>{escape(path)}</li>" for path in self.paths)
        return f'<ol class="paths">{items}</ol>'


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
        parts.append(
            _image("loss.png", "training and held-out loss against the step, one axis per loss")
        )
        parts.append(_data_link(["loss.csv"]))
    notes = Footnotes()
    rows = []
    for run in runs:
        training, held_out = run.training, run.held_out
        rows.append(
            _row(
                [
                    notes.mark(run.label, str(run.path)),
                    run.objective or "-",
                    str(training[-1][0]) if training else "-",
                    loss_cell(training[-1][1] if training else None),
                    loss_cell(held_out[-1][1] if held_out else None),
                    "finished" if run.finished else "in progress (no run.json yet)",
                ],
                numeric={2, 3, 4},
            )
        )
    headers = ["run", "objective", "last step", "last loss", "last held-out loss", "state"]
    parts += [_table(headers, rows), notes.html()]
    recorded = [run for run in runs if run.settings]
    if recorded:
        parts.append("<h3>How each was trained (from its run.json)</h3>")
        rows = [
            _row([run.label, ", ".join(f"{name} {value}" for name, value in run.settings)])
            for run in recorded
        ]
        parts.append(_table(["run", "objective and settings"], rows))
    return parts


def _bytes(count: Any) -> str:
    if not isinstance(count, (int, float)):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return "-"


def cache_rows(facts: dict[str, Any]) -> list[tuple[str, str]]:
    """What a colleague asks of a cache: how much it holds, what it keeps per position, its
    size per token."""
    tail = facts.get("tail_samples") or 0
    grid = facts.get("grid")
    rows = [
        ("examples / response tokens", f"{facts['examples']} / {facts['response_tokens']}"),
        ("exact head per position (k)", str(facts["top_k"])),
        ("tail draws per position", f"{tail} (sampled tail)" if tail else "0 (one tail bucket)"),
        ("ids kept by", str(facts.get("selection"))),
        ("tail rule", str(facts.get("tail_rule"))),
        ("bytes per response token", f"{facts['bytes_per_response_token']:.1f}"),
        ("size", _bytes(facts.get("bytes"))),
        ("precision", str(facts.get("precision"))),
        ("base student's log-probs (S0)", "yes" if facts.get("has_student") else "no"),
        ("alpha", f"{facts.get('alpha')}"),
        ("format", str(facts.get("format_version"))),
    ]
    if grid:
        points = ", ".join(f"({g:g}, {a:g})" for g, a in grid.get("points", ()))
        rows.append(("KD-to-Delta grid (gamma, alpha)", points))
    return rows


def _caches_section(caches: list[CacheFacts]) -> list[str]:
    parts = ["<h2>Teachers' cache</h2>"]
    notes = Footnotes()
    for index, cache in enumerate(caches, start=1):
        name = f"cache {index}" if len(caches) > 1 else "the cache"
        parts.append(
            f"<p>{escape(notes.mark(name, cache.path))}, trained from by "
            f"{escape(', '.join(cache.used_by))}</p>"
        )
        if cache.facts is None:
            parts.append(f'<p class="note">Not read: {escape(cache.problem or "")}</p>')
            continue
        parts.append(_table(["fact", "value"], [_row([k, v]) for k, v in cache_rows(cache.facts)]))
    parts.append(notes.html())
    return parts


def _evaluation_section(evaluation: Evaluation) -> list[str]:
    parts = [f"<h3>{escape(evaluation.source)}</h3>"]
    parts.append(f'<p class="note">{escape(evaluation.protocol)}</p>')
    notes = Footnotes()
    rows = [
        _row(
            [
                notes.mark(score.label, score.name),
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
    parts += [_table(headers, rows), notes.html()]
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


def _examples_section(evaluation: Evaluation) -> list[str]:
    """A few test rows with every model's generation side by side (the first seed of each)."""
    parts = [f"<h3>Example generations: {escape(evaluation.source)}</h3>"]
    for example in evaluation.examples:
        parts.append(
            f"<details><summary>row {example.row} ({escape(example.id)}): the prompt"
            f"</summary><pre>{escape(example.prompt)}</pre></details>"
        )
        rows = [
            f'<tr><td>{escape(label)}</td><td class="text">{escape(text)}</td></tr>'
            for label, text in [("reference", example.reference), *example.predictions]
        ]
        parts.append(_table(["model", "generation"], rows))
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
    if collected.caches:
        parts += _caches_section(collected.caches)
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
    if any(evaluation.examples for evaluation in collected.evaluations):
        parts.append("<h2>Example generations</h2>")
        for evaluation in collected.evaluations:
            if evaluation.examples:
                parts += _examples_section(evaluation)
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
