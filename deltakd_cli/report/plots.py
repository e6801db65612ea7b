"""The report's figures, drawn with matplotlib from collect.py's plain data (Agg, no window, no
global pyplot state): loss curves, ROUGE-L per model or role, paired differences. Every number
drawn is one the CSV next to the PNG holds (run.py writes both from the same data)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from deltakd_cli import faults, outputs
from deltakd_cli.errors import DeltakdError
from deltakd_cli.report.collect import Evaluation, Run, Sweep

MISSING = "deltakd report needs matplotlib: pip install 'deltakd[report]'"
LOG_SCALE_RATIO = 20.0  # log-y when the largest loss is this many times the smallest
LABEL_CHARS = 48  # longer labels are cut from the left in a figure (the tables keep them whole)


def require_matplotlib() -> None:
    """Import matplotlib with the Agg backend, or stop with one line saying how to install it.
    The figures are drawn without pyplot; a process that already runs pyplot (a notebook calling
    `write_report`) keeps its backend, as switching would close its figures."""
    try:
        import matplotlib
    except ImportError:
        raise DeltakdError(MISSING) from None
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _short(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else "…" + label[-(LABEL_CHARS - 1) :]


def save_png(figure: Any, path: Path) -> None:
    """Write the figure whole or not at all (a temp name, then a rename); no software version or
    time in the file, so the same data gives the same bytes."""
    partial = path.with_name(path.name + outputs.PARTIAL_SUFFIX)
    with outputs.writing(path, discard=partial):
        try:
            faults.point(f"write {path.name}")
            figure.savefig(partial, format="png", metadata={"Software": None})
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


# float32's largest value: training computes its losses in float32 or wider and stops on an
# infinite one, so a logged loss beyond this was not computed by a run; matplotlib cannot draw
# an axis spanning two such values (its span overflows).
DRAWABLE = 3.4028234e38


def _drawable(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(step, value) for step, value in points if abs(value) <= DRAWABLE]


def undrawable(runs: list[Run]) -> list[str]:
    """One note per run with losses the loss figure leaves out (beyond ±DRAWABLE)."""
    notes = []
    for run in runs:
        points = [*run.training, *run.held_out]
        left_out = len(points) - len(_drawable(points))
        if left_out:
            notes.append(
                f"{run.label}: {left_out} loss value(s) beyond ±{DRAWABLE:.1e} (float32's range) "
                "left out of the loss figure"
            )
    return notes


def uses_log_scale(runs: list[Run]) -> bool:
    """Log-y helps when the losses span more than LOG_SCALE_RATIO (and all are positive)."""
    values = [v for run in runs for _, v in _drawable([*run.training, *run.held_out])]
    if not values or min(values) <= 0:
        return False
    return max(values) / min(values) > LOG_SCALE_RATIO


def loss_kind(run: Run) -> str:
    """The axis a run's loss is drawn on: losses of different objectives are different
    quantities (cross-entropy against the reference, a divergence from a target), so each
    objective has its own axis; a run in progress has recorded none yet."""
    objective = run.objective
    if objective is None:
        return "loss of runs in progress (objective not recorded yet)"
    if objective == "sft":
        return "cross-entropy on the reference (SFT, finetune)"
    from deltakd_cli.method import objectives

    entry = objectives.OBJECTIVES.get(objective)
    described = entry.description if entry is not None else objective
    return f"{objective}: {described}"


def plain_log_ticks(axes: Any) -> None:
    """Log-axis ticks as plain numbers (`10`, `0.1`): the default ones are mathtext, which the
    report turns off (labels are data), so they would print as `$\\mathdefault{10^{1}}$`."""
    from matplotlib import ticker

    axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(ticker.NullFormatter())


def outside_legend(axes: Any) -> Any:
    """A legend to the right of the axes, so it never covers a point."""
    return axes.legend(
        fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0
    )


def loss_figure(runs: list[Run]) -> Any | None:
    """Training loss (solid) and held-out loss (dashed, same colour) against the step, one line
    per run and one axis per kind of loss (`loss_kind`); None when no run has a logged step.
    Losses beyond ±DRAWABLE are left out, with a note under the axes (`undrawable`)."""
    drawn = [run for run in runs if run.points]
    if not drawn:
        return None
    kinds: dict[str, list[Run]] = {}
    for run in drawn:
        kinds.setdefault(loss_kind(run), []).append(run)
    figure = _figure(9.5, 0.6 + 3.6 * len(kinds))
    colours = {run.label: f"C{index % 10}" for index, run in enumerate(drawn)}
    for index, (kind, members) in enumerate(kinds.items()):
        axes = figure.add_subplot(len(kinds), 1, index + 1)
        any_held_out = False
        for run in members:
            colour = colours[run.label]
            training, held_out = _drawable(run.training), _drawable(run.held_out)
            if training:
                steps, values = zip(*training, strict=True)
                marker = "o" if len(training) <= 25 else None
                axes.plot(
                    steps, values, "-", color=colour, marker=marker, markersize=3,
                    label=_short(run.label),
                )  # fmt: skip
            if held_out:
                any_held_out = True
                steps, values = zip(*held_out, strict=True)
                axes.plot(
                    steps, values, "--", color=colour, marker="s", markersize=4,
                    label=_short(f"{run.label} (held-out)"),
                )  # fmt: skip
        log = uses_log_scale(members)
        if log:
            axes.set_yscale("log")
            plain_log_ticks(axes)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("loss (log scale)" if log else "loss")
        title = "training (solid)" + (" and held-out (dashed)" if any_held_out else "")
        axes.set_title(f"{textwrap.shorten(kind, 90)}\n{title}", fontsize="medium")
        axes.grid(True, alpha=0.3)
        outside_legend(axes)
    notes = undrawable(drawn)
    if notes:
        figure.supxlabel("\n".join(_short(note) for note in notes), fontsize="small")
    return figure


def _rows_height(count: int) -> float:
    return 1.5 + 0.45 * max(count, 1)


def rouge_figure(evaluations: list[Evaluation]) -> Any | None:
    """ROUGE-L per model (or group/role) of each report, one panel per report: the mean as a
    dot, ± the std as a bar where there is one (a spread over seeds or models, NOT a confidence
    interval: the report has no interval for a single model's score), each seed's or model's
    score as a small hollow dot."""
    panels = [evaluation for evaluation in evaluations if evaluation.scores]
    if not panels:
        return None
    heights = [_rows_height(len(e.scores)) for e in panels]
    figure = _figure(9.5, sum(heights) + 0.3)
    grid = figure.add_gridspec(len(panels), 1, height_ratios=heights)
    for index, evaluation in enumerate(panels):
        axes = figure.add_subplot(grid[index])
        scores = evaluation.scores
        ys = list(range(len(scores)))[::-1]
        spread_shown = points_shown = False
        for y, score in zip(ys, scores, strict=True):
            if score.std is not None:
                axes.errorbar(
                    score.mean, y, xerr=score.std, fmt="none", ecolor="C0", capsize=4,
                    label=None if spread_shown else "± std (a spread over seeds/models, not a CI)",
                )  # fmt: skip
                spread_shown = True
            if score.points:
                axes.plot(
                    score.points, [y] * len(score.points), "o", markerfacecolor="none",
                    markeredgecolor="0.45", markersize=5,
                    label=None if points_shown else "each seed / model",
                )  # fmt: skip
                points_shown = True
        axes.plot(
            [s.mean for s in scores], ys, "o", color="C0", markersize=7, label="mean", zorder=3
        )
        axes.set_yticks(ys, [_short(score.label) for score in scores])
        axes.set_ylim(-0.7, len(scores) - 0.3)
        axes.set_xlabel("ROUGE-L (F x 100)")
        axes.set_title(f"ROUGE-L\n{_short(evaluation.source)}", fontsize="medium")
        axes.grid(True, axis="x", alpha=0.3)
        outside_legend(axes)
    return figure


def differences_figure(evaluations: list[Evaluation]) -> Any | None:
    """Each paired difference with its bootstrap interval (a bar), a line at zero, the ones
    whose interval excludes zero marked "beyond noise" (filled, dark), and the per-seed or
    per-model differences as small dots on the same row."""
    panels = [evaluation for evaluation in evaluations if evaluation.differences]
    if not panels:
        return None
    heights = [_rows_height(len(e.differences)) for e in panels]
    figure = _figure(9.5, sum(heights) + 0.3)
    grid = figure.add_gridspec(len(panels), 1, height_ratios=heights)
    for index, evaluation in enumerate(panels):
        axes = figure.add_subplot(grid[index])
        rows = evaluation.differences
        ys = list(range(len(rows)))[::-1]
        confidence = round(100 * evaluation.confidence)
        shown: set[str] = set()

        def once(name: str, shown: set[str] = shown) -> str | None:
            if name in shown:
                return None
            shown.add(name)
            return name

        axes.axvline(0.0, color="0.3", linewidth=1)
        for y, entry in zip(ys, rows, strict=True):
            beyond = entry.beyond_noise
            colour = "C3" if beyond else "0.55"
            axes.errorbar(
                entry.difference, y,
                xerr=[[entry.difference - entry.ci_low], [entry.ci_high - entry.difference]],
                fmt="o", color=colour, ecolor=colour, capsize=4, markersize=7,
                markerfacecolor=colour if beyond else "white",
                label=once(f"{confidence}% CI, beyond noise" if beyond else
                           f"{confidence}% CI, within noise"),
            )  # fmt: skip
            if entry.points:
                axes.plot(
                    entry.points, [y] * len(entry.points), "x", color="0.2", markersize=5,
                    label=once(f"per {(entry.points_are or 'seed').rstrip('s')}"),
                )  # fmt: skip
        labels = [
            _short(entry.label) + ("  [beyond noise]" if entry.beyond_noise else "")
            for entry in rows
        ]
        axes.set_yticks(ys, labels)
        axes.set_ylim(-0.7, len(rows) - 0.3)
        axes.set_xlabel(f"ROUGE-L difference ({confidence}% paired bootstrap interval)")
        what = "group comparisons" if evaluation.differences_are == "groups" else "vs the baseline"
        axes.set_title(
            f"Paired differences, {what}\n{_short(evaluation.source)}", fontsize="medium"
        )
        axes.grid(True, axis="x", alpha=0.3)
        outside_legend(axes)
    return figure


def sweep_figure(sweeps: list[Sweep]) -> Any | None:
    """Per --sweep: ROUGE-L against gamma on the test rows (mean over training seeds, ± their
    std, each seed a hollow dot) with the validation score that chose the point (dashed) and the
    chosen point ringed; below, each point minus SFT on test with its 95% paired bootstrap
    interval (a confidence interval, unlike the std above)."""
    if not sweeps:
        return None
    figure = _figure(9.5, 6.5 * len(sweeps))
    grid = figure.add_gridspec(2 * len(sweeps), 1, height_ratios=[3, 2] * len(sweeps))
    for index, sweep in enumerate(sweeps):
        top, bottom = figure.add_subplot(grid[2 * index]), figure.add_subplot(grid[2 * index + 1])
        for alpha in sorted({p.alpha for p in sweep.points}):
            points = sorted((p for p in sweep.points if p.alpha == alpha), key=lambda p: p.gamma)
            gammas = [p.gamma for p in points]
            name = f" (alpha {alpha:g})" if len({p.alpha for p in sweep.points}) > 1 else ""
            top.errorbar(
                gammas, [p.test.mean for p in points],
                yerr=[p.test.std or 0.0 for p in points], fmt="o-", capsize=4,
                label=f"test{name}: mean ± std over training seeds",
            )  # fmt: skip
            for p in points:
                if p.test.points:
                    xs = [p.gamma] * len(p.test.points)
                    top.plot(xs, p.test.points, "o", markerfacecolor="none",
                             markeredgecolor="0.45", markersize=4)  # fmt: skip
            held = f"validation{name} ({sweep.validation_rows} held-out training rows)"
            top.plot(gammas, [p.validation for p in points], "s--", alpha=0.7, label=held)
            with_ci = [p for p in points if p.versus_sft is not None]
            if with_ci:
                bottom.errorbar(
                    [p.gamma for p in with_ci], [p.versus_sft.difference for p in with_ci],
                    yerr=[[p.versus_sft.difference - p.versus_sft.ci_low for p in with_ci],
                          [p.versus_sft.ci_high - p.versus_sft.difference for p in with_ci]],
                    fmt="o", capsize=4, label=f"minus SFT{name}",
                )  # fmt: skip
        for p in sweep.points:
            if p.chosen:
                top.plot(p.gamma, p.test.mean, "o", markersize=16, markerfacecolor="none",
                         markeredgecolor="C3", markeredgewidth=2,
                         label="chosen on validation")  # fmt: skip
        top.set_ylabel("ROUGE-L (F x 100)")
        top.set_title(f"KD (gamma 0) to Delta-KD (gamma 1)\n{_short(sweep.source)}",
                      fontsize="medium")  # fmt: skip
        top.grid(True, alpha=0.3)
        outside_legend(top)
        bottom.axhline(0.0, color="0.3", linewidth=1)
        bottom.set_xlabel("gamma")
        bottom.set_ylabel("ROUGE-L minus SFT\n(95% paired bootstrap)")
        bottom.grid(True, alpha=0.3)
    return figure
