"""bench/heldout.py: the held-out KL and cross-entropy every student of the TRL comparison is
scored with, and its paired bootstrap (the bench itself is not part of the tests; trl is not
needed here)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from heldout import (  # noqa: E402
    cross_entropy_per_position,
    kl_per_position,
    paired_token_bootstrap,
    per_row_sums,
    response_labels,
    response_logprobs,
    seeds_and_rows_bootstrap,
)

from deltakd_cli.data import TokenizedExample  # noqa: E402


def test_kl_matches_the_definition_and_is_zero_on_itself():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(torch.randn(5, 11, generator=generator), dim=-1)
    student = torch.log_softmax(torch.randn(5, 11, generator=generator), dim=-1)
    expected = (teacher.exp() * (teacher - student)).sum(-1)
    assert torch.allclose(kl_per_position(teacher, student).float(), expected, atol=1e-6)
    assert torch.allclose(kl_per_position(teacher, teacher), torch.zeros(5, dtype=torch.float64))
    assert (kl_per_position(teacher, student) > 0).all()


def test_kl_counts_zero_teacher_mass_as_zero():
    teacher = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    student = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    assert float(kl_per_position(teacher, student)[0]) == pytest.approx(np.log(2))
    # the student may put no mass where the teacher has none either
    assert float(kl_per_position(teacher, teacher)[0]) == 0.0


def test_kl_refuses_mismatched_shapes():
    with pytest.raises(ValueError):
        kl_per_position(torch.zeros(2, 3), torch.zeros(2, 4))


def test_cross_entropy_is_minus_the_label_log_prob():
    logprobs = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), dim=-1)
    ce = cross_entropy_per_position(logprobs, torch.tensor([2, 0]))
    assert ce.tolist() == pytest.approx([-float(logprobs[0, 2]), np.log(3)])


class Shifted(torch.nn.Module):
    """A toy causal LM: the logits at position p favour token input[p] + 1."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        logits = 5.0 * torch.nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab + 2)
        return type("Out", (), {"logits": logits.float()})()


def test_response_positions_and_labels_are_the_response_tokens():
    examples = [
        TokenizedExample([1, 2, 3, 4, 5], [False, False, False, True, True]),
        TokenizedExample([2, 3], [False, True]),
    ]
    labels = response_labels(examples)
    assert [label.tolist() for label in labels] == [[4, 5], [3]]
    logprobs = response_logprobs(Shifted(8), examples, vocab_size=8)
    assert [tuple(lp.shape) for lp in logprobs] == [(2, 8), (1, 8)]  # extra logits dropped
    # the toy model predicts every next token, so it is the most likely everywhere
    for lp, label in zip(logprobs, labels, strict=True):
        assert (lp.argmax(-1) == label).all()


def test_per_row_sums_take_an_iterator():
    sums, counts = per_row_sums(iter([torch.tensor([1.0, 2.0]), torch.tensor([3.0])]))
    assert sums.tolist() == [3.0, 3.0] and counts.tolist() == [2.0, 1.0]


def test_bootstrap_per_token_means_and_noise():
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 30, size=40).astype(float)
    a = counts * 1.0 + rng.normal(0, 1, size=40)
    same = paired_token_bootstrap(a, a + rng.normal(0, 0.5, size=40), counts, n_resamples=2000)
    assert same["a"] == pytest.approx(a.sum() / counts.sum())
    assert same["within_noise"] and same["ci_low"] < 0 < same["ci_high"]
    worse = paired_token_bootstrap(a, a + counts * 0.2, counts, n_resamples=2000)
    assert worse["difference"] == pytest.approx(0.2)
    assert not worse["within_noise"] and worse["ci_low"] > 0
    assert paired_token_bootstrap(a, a, counts, n_resamples=100)["difference"] == 0.0


def test_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError):
        paired_token_bootstrap([1.0], [1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_token_bootstrap([1.0], [1.0], [0.0])


def test_seeds_and_rows_bootstrap_counts_training_order_noise():
    rng = np.random.default_rng(1)
    counts = rng.integers(5, 30, size=40).astype(float)
    base = counts * 1.5 + rng.normal(0, 1, size=40)
    # Three runs per system whose per-token means differ by a run-level offset (training order).
    a_runs = [base + counts * offset for offset in (0.0, 0.1, -0.1)]
    b_runs = [base + counts * (0.05 + offset) for offset in (0.1, -0.1, 0.0)]
    result = seeds_and_rows_bootstrap(a_runs, b_runs, counts, n_resamples=4000)
    assert result["a"] == pytest.approx(base.sum() / counts.sum())
    assert result["difference"] == pytest.approx(0.05)
    assert result["a_runs"] == pytest.approx([r.sum() / counts.sum() for r in a_runs])
    # Rows alone call a 0.05 gap between two single runs certain; the run spread (0.1) does not.
    rows_only = paired_token_bootstrap(a_runs[0], b_runs[2], counts, n_resamples=4000)
    assert not rows_only["within_noise"]
    assert result["within_noise"] and result["ci_low"] < -0.05 and result["ci_high"] > 0.1
    # Identical runs: only row noise is left, and a real gap is found.
    same = seeds_and_rows_bootstrap([base] * 3, [base + counts * 0.2] * 3, counts, 2000)
    assert same["difference"] == pytest.approx(0.2) and same["ci_low"] > 0.15


def test_seeds_and_rows_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError):
        seeds_and_rows_bootstrap([[1.0, 2.0]], [[1.0]], [1.0, 1.0])
    with pytest.raises(ValueError):
        seeds_and_rows_bootstrap([[1.0]], [[1.0]], [0.0])
