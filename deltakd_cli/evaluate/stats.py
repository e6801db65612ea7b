"""The statistics of a report, pure functions over scores: per-seed corpus means with their mean
and sample std, each row averaged over seeds, the paired bootstrap between two models (or two
groups of models, e.g. a student's training seeds) over rows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from deltakd_cli.evaluate import rouge

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
BOOTSTRAP_CONFIDENCE = 0.95


def paired_bootstrap(
    a_scores: Sequence[float],
    b_scores: Sequence[float],
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = BOOTSTRAP_CONFIDENCE,
) -> dict[str, float]:
    """Mean of b - a over paired rows, with a percentile bootstrap interval: rows are resampled
    with replacement (the same rows for both, so what the models share cancels), the mean
    difference is taken per resample, and the interval is its (1-c)/2 and (1+c)/2 quantiles.
    Reproducible under `seed`."""
    a = np.asarray(a_scores, dtype=np.float64)
    b = np.asarray(b_scores, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(
            f"paired scores must be two 1-D arrays of one length: {a.shape}, {b.shape}"
        )
    if a.size == 0:
        raise ValueError("paired_bootstrap needs at least one row")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired_bootstrap got non-finite scores")
    if n_resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError("n_resamples must be >= 1 and confidence in (0, 1)")
    differences = b - a
    rows = differences.size
    rng = np.random.default_rng(seed)
    resampled_means = np.empty(n_resamples)
    chunk = max(1, (1 << 22) // rows)  # bounded memory; depends only on `rows`, so reproducible
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        picks = rng.integers(0, rows, size=(size, rows))
        resampled_means[start : start + size] = differences[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled_means, [tail, 1.0 - tail])
    return {
        "difference": float(differences.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "confidence": confidence,
        "n_resamples": n_resamples,
        "seed": seed,
        "n_rows": int(rows),
    }


def mean_and_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    if not values:
        raise ValueError("no values")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance)


def summarize_model(
    name: str, scores_by_seed: dict[int | None, list[dict[str, float]]]
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Per-seed corpus means, their mean and std, and each row's scores averaged over seeds.
    `scores_by_seed[seed][row]` holds one row's metrics."""
    per_seed = []
    for seed, row_scores in scores_by_seed.items():
        per_seed.append({"seed": seed, **rouge.corpus_scores(row_scores)})
    rows = len(next(iter(scores_by_seed.values())))
    mean: dict[str, float] = {}
    std: dict[str, float | None] = {}
    for metric in rouge.METRICS:
        mean[metric], std[metric] = mean_and_std([entry[metric] for entry in per_seed])
    row_means = [
        {
            metric: sum(scores[row][metric] for scores in scores_by_seed.values())
            / len(scores_by_seed)
            for metric in rouge.METRICS
        }
        for row in range(rows)
    ]
    summary = {
        "name": name,
        "n_rows": rows,
        "n_seeds": len(per_seed),
        "per_seed": per_seed,
        "mean": mean,
        "std": std,
    }
    return summary, row_means


def beyond_noise(result: dict[str, Any]) -> bool:
    """The difference's interval excludes 0."""
    return result["ci_low"] > 0 or result["ci_high"] < 0


def read_difference(entry: dict[str, Any]) -> dict[str, Any]:
    """A difference as written now (`model`, `minus`, `beyond_noise`, `per_model_differences`)
    from a report of any deltakd version (earlier ones wrote `baseline`, `excludes_zero`, and a
    pipeline's `per_seed_differences`)."""
    entry = dict(entry)
    renamed = {"baseline": "minus", "excludes_zero": "beyond_noise",
               "per_seed_differences": "per_model_differences"}  # fmt: skip
    for old, new in renamed.items():
        if old in entry:
            entry.setdefault(new, entry.pop(old))
    return entry


def compare_to_baseline(
    baseline: str, row_means: dict[str, list[dict[str, float]]]
) -> list[dict[str, Any]]:
    """For every other model and metric: mean(model - baseline) over rows with a paired
    bootstrap interval."""
    differences = []
    base_rows = row_means[baseline]
    for name, rows in row_means.items():
        if name == baseline:
            continue
        for metric in rouge.METRICS:
            result = paired_bootstrap(
                [row[metric] for row in base_rows], [row[metric] for row in rows]
            )
            differences.append(
                {
                    "model": name,
                    "minus": baseline,
                    "metric": metric,
                    **result,
                    "beyond_noise": beyond_noise(result),
                }
            )
    return differences


def summarize_group(name: str, members: list[dict[str, Any]], metric: str = "rougeL") -> dict:
    """One line for a group of models (e.g. a student trained with several seeds): the mean of
    its models' scores with their std over models, or, for a group of one, that model's score
    and its std over eval seeds."""
    per_model = [member["mean"][metric] for member in members]
    if len(members) > 1:
        mean, std = mean_and_std(per_model)
        spread = "models"
    else:
        mean, std = per_model[0], members[0]["std"][metric]
        spread = "eval seeds" if std is not None else None
    return {
        "name": name,
        "models": [member["name"] for member in members],
        "metric": metric,
        "mean": mean,
        "std": std,
        "spread": spread,
        "per_model": per_model,
        "runs": sum(member["n_seeds"] for member in members),
        "rows": members[0]["n_rows"],
    }


def group_row_means(
    row_means: dict[str, list[dict[str, float]]], models: list[str], metric: str = "rougeL"
) -> list[float]:
    """Each row's score averaged over a group's models (each already averaged over its seeds)."""
    rows = len(row_means[models[0]])
    return [
        sum(row_means[model][row][metric] for model in models) / len(models) for row in range(rows)
    ]


def compare_groups(
    first: dict[str, Any], second: dict[str, Any], first_rows: list[float], second_rows: list[float]
) -> dict[str, Any]:
    """first - second with a paired bootstrap over rows; with several models a side and as many
    on each, also the difference model by model (a student's seeds pair up: same data order,
    same initialisation)."""
    result = paired_bootstrap(second_rows, first_rows)
    entry = {"model": first["name"], "minus": second["name"], "metric": first["metric"], **result}
    entry["beyond_noise"] = beyond_noise(result)
    if len(first["per_model"]) > 1 and len(first["per_model"]) == len(second["per_model"]):
        entry["per_model_differences"] = [
            a - b for a, b in zip(first["per_model"], second["per_model"], strict=True)
        ]
    return entry
