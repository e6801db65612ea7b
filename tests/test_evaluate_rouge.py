"""The scorer against rouge_score itself and against hand-checked values."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from deltakd_cli.evaluate import rouge

ROWS = [
    ("the cat sat on the mat", ["the cat sat on the mat"]),
    ("a cat was sitting on mats", ["the cat sat on the mat"]),
    ("The quick brown fox jumps.", ["a quick fox jumped over the dog", "the brown fox jumps"]),
    ("running dogs chase cats", ["the dog runs", "cats are chased by running dogs", "nothing"]),
    ("Paris", ["paris", "The capital of France is Paris."]),
    ("", ["an empty prediction scores zero"]),
    ("words with no overlap at all", ["entirely different tokens here", "still nothing"]),
]


def _reference_scores(prediction: str, references: list[str]) -> dict[str, float]:
    """Independent: one RougeScorer per type, built as the papers build it, max over refs, x100."""
    result = {}
    for rouge_type in ("rougeL", "rouge1", "rouge2"):
        scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=True)
        pair_scores = [scorer.score(ref, prediction)[rouge_type].fmeasure for ref in references]
        result[rouge_type] = 100.0 * max(pair_scores)
    return result


@pytest.mark.parametrize(("prediction", "references"), ROWS)
def test_score_row_matches_rouge_score_per_pair(prediction, references):
    ours = rouge.score_row(prediction, references)
    expected = _reference_scores(prediction, references)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-9)


@pytest.mark.parametrize(("prediction", "references"), [r for r in ROWS if len(r[1]) > 1])
def test_multi_reference_matches_rouge_score_score_multi(prediction, references):
    scorer = rouge_scorer.RougeScorer(["rougeL", "rouge1", "rouge2"], use_stemmer=True)
    multi = scorer.score_multi(references, prediction)
    ours = rouge.score_row(prediction, references)
    for name in ("rougeL", "rouge1", "rouge2"):
        assert ours[name] == pytest.approx(100.0 * multi[name].fmeasure, abs=1e-9)


def test_multi_reference_takes_the_best_reference_per_metric():
    # Hand computation. Prediction "alpha beta gamma delta":
    #   vs "alpha beta": LCS 2, P 2/4, R 2/2 -> F 2/3; bigrams: 1 shared of 3 and 1 -> F 1/2.
    #   vs "delta gamma beta alpha": LCS 1 -> F 1/4; unigrams all shared -> ROUGE-1 F 1.
    scores = rouge.score_row("alpha beta gamma delta", ["alpha beta", "delta gamma beta alpha"])
    assert scores["rougeL"] == pytest.approx(100 * 2 / 3)
    assert scores["rouge1"] == pytest.approx(100.0)  # from the second reference
    assert scores["rouge2"] == pytest.approx(100 * 1 / 2)  # from the first reference
    assert scores["exact_match"] == 0.0


def test_hand_checkable_values():
    assert rouge.score_row("the cat", ["the cat"])["rougeL"] == pytest.approx(100.0)
    swapped = rouge.score_row("cat the", ["the cat"])
    assert swapped["rougeL"] == pytest.approx(50.0)  # LCS 1 of 2 both ways
    assert swapped["rouge1"] == pytest.approx(100.0)
    assert swapped["rouge2"] == pytest.approx(0.0)
    # use_stemmer=True: "running dogs" and "run dog" share both stems
    assert rouge.score_row("running dogs", ["run dog"])["rougeL"] == pytest.approx(100.0)
    # rouge_score's tokenizer keeps ASCII letters and digits only: other scripts score 0
    assert rouge.score_row("日本語", ["日本語"])["rougeL"] == 0.0


def test_exact_match_normalisation():
    assert rouge.normalize_for_exact_match("  The   Answer, is: 42! ") == "the answer is 42"
    assert rouge.score_row("The answer.", ["the  answer"])["exact_match"] == 100.0
    assert rouge.score_row("an answer", ["answer"])["exact_match"] == 0.0  # articles are kept
    assert rouge.score_row("b", ["a", "B!"])["exact_match"] == 100.0  # any reference
    assert rouge.score_row("日本語", ["日本語"])["exact_match"] == 100.0


def test_corpus_scores_are_the_mean_of_rows_times_100():
    predictions = [p for p, _ in ROWS]
    references = [r for _, r in ROWS]
    expected = sum(_reference_scores(p, r)["rougeL"] for p, r in ROWS) / len(ROWS)
    assert rouge.corpus_rouge_l(predictions, references) == pytest.approx(expected)
    corpus = rouge.corpus_scores(rouge.score_rows(predictions, references))
    assert set(corpus) == set(rouge.METRICS)
    assert corpus["exact_match"] == pytest.approx(100 * 2 / len(ROWS))  # rows 0 and 4
    assert 0.0 < corpus["rougeL"] < 100.0


def test_scorer_rejects_bad_input():
    with pytest.raises(ValueError):
        rouge.score_row("text", [])
    with pytest.raises(ValueError):
        rouge.score_row("text", "a bare string is not a list of references")
    with pytest.raises(ValueError):
        rouge.score_rows(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        rouge.corpus_scores([])
