"""The scorer: ROUGE-L/1/2 F-measure and exact match, as pure functions over strings.

ROUGE comes from Google's `rouge_score` package with `use_stemmer=True`, the setting MiniLLM and
DistiLLM report (its tokenizer lowercases and keeps only the ASCII letters and digits, so text in
other scripts scores 0). A row with several references takes, per metric, the best score over
them; the corpus score is the mean over rows. Scores are on the 0-100 scale.

Exact match compares texts after the normalisation of the Super-NaturalInstructions evaluation
script: lowercase, drop ASCII punctuation, collapse whitespace (articles are kept).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from functools import lru_cache

METRICS = ("rougeL", "rouge1", "rouge2", "exact_match")
ROUGE_TYPES = ("rougeL", "rouge1", "rouge2")
METRIC_LABELS = {
    "rougeL": "ROUGE-L",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "exact_match": "Exact match",
}

_PUNCTUATION = str.maketrans("", "", string.punctuation)


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    # One scorer for all three types: tokenisation and stemming are per type identical to a
    # RougeScorer(['rougeL'], use_stemmer=True) built on its own.
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def normalize_for_exact_match(text: str) -> str:
    """Lowercase, remove ASCII punctuation, collapse runs of whitespace."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def rouge_pair(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-L/1/2 F-measure (0-1) of one prediction against one reference."""
    scores = _scorer().score(reference, prediction)  # rouge_score's order: (target, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def score_row(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """Every metric of one row on the 0-100 scale: the max over the references, per metric."""
    if isinstance(references, str) or not references:
        raise ValueError("references must be a non-empty sequence of strings")
    best = {name: 0.0 for name in METRICS}
    normalized_prediction = normalize_for_exact_match(prediction)
    for reference in references:
        for name, value in rouge_pair(prediction, reference).items():
            best[name] = max(best[name], value)
        if normalize_for_exact_match(reference) == normalized_prediction:
            best["exact_match"] = 1.0
    return {name: 100.0 * value for name, value in best.items()}


def score_rows(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> list[dict[str, float]]:
    """`score_row` for aligned lists of predictions and reference lists."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference rows")
    return [score_row(p, r) for p, r in zip(predictions, references, strict=True)]


def corpus_scores(row_scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over rows (0-100)."""
    if not row_scores:
        raise ValueError("no rows to average")
    return {name: sum(row[name] for row in row_scores) / len(row_scores) for name in METRICS}


def corpus_rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """The field's headline number: ROUGE-L F, max over references, mean over rows, times 100."""
    return corpus_scores(score_rows(predictions, references))["rougeL"]
