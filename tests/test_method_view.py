"""method/view.py: the tail estimators over one target view, against dense float64 references.

The corrected tail (the bucket plus a sampled correction, docs/method.md) must be unbiased in
value and gradient for every divergence, be the plain sampled tail bit for bit at beta 0, and
have no noise where the student's tail already has the target's shape."""

from __future__ import annotations

import math

import pytest
import torch
from objective_calls import divergence

from deltakd_cli.errors import DeltakdError
from deltakd_cli.method.fidelity import view_grad_cosine
from deltakd_cli.method.objectives import OBJECTIVES
from deltakd_cli.method.spec import CacheFacts, TargetSpec, tail_estimator
from deltakd_cli.method.targets import TailDraws, build_cached_targets, exact_family_target

GRID = ((0.0, 1.0), (0.5, 1.0), (1.0, 1.0))


def replicated(vocab: int = 24, rows: int = 4000, seed: int = 0, theta_scale: float = 1.0):
    """One position's full distributions (float64), replicated over `rows` positions whose
    draws are independent (each row is its own example index), and a student theta."""
    generator = torch.Generator().manual_seed(seed)
    tuned, base, student = (
        torch.log_softmax(2 * torch.randn(1, vocab, generator=generator, dtype=torch.float64), -1)
        for _ in range(3)
    )
    theta = theta_scale * torch.randn(1, vocab, generator=generator, dtype=torch.float64)
    return tuple(t.expand(rows, -1).clone() for t in (tuned, base, student, theta))


def drawn_cache(tuned, base, student, k: int = 4, samples: int = 6, seed: int = 0):
    """A student-aware grid cache (ids serving every grid point, the mass-matched tail at alpha
    1, the family's exact tails, draws from the mixture proposal), as cache-teachers builds it."""
    rows = tuned.shape[0]
    draws = TailDraws(samples, seed, torch.arange(rows), torch.zeros(rows, dtype=torch.long))
    return build_cached_targets(
        tuned.float(), base.float(), student.float(), k, "grid", 1.0, "mass-matched", GRID, draws
    )


def dense_value_and_gradient(objective, settings, tuned, base, student, theta):
    """The objective's divergence over the whole vocabulary, in float64, at one position: the
    same registered divergence on a cache that keeps every id (k = |V|; tested equal to the
    dense definitions in test_losses.py), and its gradient by autograd."""
    vocab = tuned.shape[1]
    full = build_cached_targets(
        tuned[:1], base[:1], student[:1], vocab, "target", 1.0, "mass-matched", GRID
    )
    logits = theta[:1].clone().requires_grad_(True)
    value = divergence(objective, logits, full, tail="bucket", cache_alpha=1.0, cache_grid=GRID,
                       **settings)  # fmt: skip
    value.sum().backward()
    return value.detach()[0], logits.grad[0]


def per_row(objective, settings, cached, theta, tail, beta):
    logits = theta.float().clone().requires_grad_(True)
    values = divergence(objective, logits, cached, tail=tail, tail_beta=beta, cache_alpha=1.0,
                        cache_grid=GRID, **settings)  # fmt: skip
    values.sum().backward()
    return values.detach().double(), logits.grad.double()


def assert_unbiased(estimates: torch.Tensor, dense: torch.Tensor) -> None:
    """The mean over independent rows equals the dense reference within 5 standard errors (from
    the measured spread), entry by entry, plus float32 rounding; and the estimate is noisy at
    all (a check that could not fail would pass a biased constant)."""
    mean = estimates.mean(dim=0)
    standard_error = estimates.std(dim=0) / estimates.shape[0] ** 0.5
    assert ((mean - dense).abs() <= 5 * standard_error + 2e-4).all(), (mean - dense).abs().max()
    assert standard_error.max() > 0


LINEAR = [
    ("kd", {}),
    ("delta", {}),
    ("kd-to-delta", {"gamma": 0.5}),
    ("delta-mix", {"mix": 0.5}),
]
NONLINEAR = [("reverse-kl", {}), ("gjsd", {"beta": 0.5}), ("skew-kl", {"skew": 0.1}), ("tv", {})]


@pytest.mark.parametrize("beta", [0.5, 1.0])
@pytest.mark.parametrize(("objective", "settings"), LINEAR + NONLINEAR)
def test_the_corrected_tail_is_unbiased_in_value_and_gradient(objective, settings, beta):
    """4,000 independent rows of one position, each with its own draws, away from S0: the mean
    corrected value and gradient equal the dense full-vocabulary ones, for every divergence (each
    is a sum of degree-1 homogeneous terms, which is what the correction needs)."""
    tuned, base, student, theta = replicated(seed=3)
    cached = drawn_cache(tuned, base, student)
    values, gradients = per_row(objective, settings, cached, theta, "corrected", beta)
    dense_value, dense_gradient = dense_value_and_gradient(
        objective, settings, tuned, base, student, theta
    )
    assert_unbiased(gradients, dense_gradient)
    assert_unbiased(values.unsqueeze(1), dense_value.unsqueeze(0))
    # the bucket alone, on the same head, is biased where the correction is not
    _, biased = per_row(objective, settings, cached[:1], theta[:1], "bucket", 1.0)
    assert (biased[0] - dense_gradient).abs().max() > 5 * (
        gradients.mean(0) - dense_gradient
    ).abs().max()


@pytest.mark.parametrize(("objective", "settings"), LINEAR + NONLINEAR)
def test_beta_zero_is_the_sampled_tail_bit_for_bit(objective, settings):
    tuned, base, student, theta = replicated(rows=64, seed=5)
    cached = drawn_cache(tuned, base, student)
    corrected = per_row(objective, settings, cached, theta, "corrected", 0.0)
    sampled = per_row(objective, settings, cached, theta, "sampled", 1.0)
    assert torch.equal(corrected[0], sampled[0]) and torch.equal(corrected[1], sampled[1])


def test_the_correction_is_silent_where_the_students_tail_has_the_targets_shape():
    """KD with a student whose logits equal the tuned teacher's outside K (any values at K):
    r's tail is proportional to p_theta's, so b = r on the tail and every correction term is 0.
    Every row then gives the same value and gradient (no noise), while the plain sampled tail
    still varies from row to row."""
    tuned, base, student, _ = replicated(rows=500, seed=7)
    cached = drawn_cache(tuned, base, student)
    theta = tuned.clone()
    kept = cached.ids[0]
    theta[:, kept] += torch.linspace(-1.0, 1.0, len(kept), dtype=theta.dtype)
    values, gradients = per_row("kd", {}, cached, theta, "corrected", 1.0)
    assert values.std() < 1e-6 and gradients.std(dim=0).max() < 1e-6
    noisy_values, noisy_gradients = per_row("kd", {}, cached, theta, "sampled", 1.0)
    assert noisy_values.std() > 1e-3 and noisy_gradients.std(dim=0).max() > 1e-3
    # and it is the exact value: the bucket is exact here too
    dense_value, dense_gradient = dense_value_and_gradient("kd", {}, tuned, base, student, theta)
    torch.testing.assert_close(values[0], dense_value.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(gradients[0], dense_gradient.double(), atol=1e-5, rtol=0)


def test_at_s0_the_corrected_delta_gradient_is_closer_to_the_dense_one_than_the_sampled():
    """The reason the corrected tail exists (docs/method.md): near S0 the Delta gradient is
    small and the sampled target's noise swamps it. On ONE cache of 400 random positions, the
    corrected tail's gradient cosine with the dense one beats the plain sampled tail's."""
    generator = torch.Generator().manual_seed(11)
    rows, vocab = 400, 300
    logits = [1.5 * torch.randn(rows, vocab, generator=generator) for _ in range(2)]
    shift = 0.7 * torch.randn(rows, vocab, generator=generator)
    base = torch.log_softmax(logits[0], -1)
    tuned = torch.log_softmax(logits[0] + shift, -1)  # a tuning shift of the base teacher
    student = torch.log_softmax(logits[0] + 0.5 * logits[1], -1)  # a student near the base
    draws = TailDraws(32, 0, torch.arange(rows), torch.zeros(rows, dtype=torch.long))
    cached = build_cached_targets(tuned, base, student, 16, "grid", 1.0, "mass-matched", GRID,
                                  draws)  # fmt: skip
    spec, facts = TargetSpec(((1.0, 1.0),), 1.0), CacheFacts(1.0, GRID, 1.0)
    cosine = {
        name: float(
            view_grad_cosine(student, tuned, base, cached, spec, tail_estimator(name), facts).mean()
        )
        for name in ("sampled", "corrected")
    }
    assert cosine["corrected"] > cosine["sampled"] + 0.05, cosine


def test_the_target_of_every_family_objective_is_a_mixture_of_family_points():
    """objectives.py names each target once; the view builds it: kd is gamma 0, delta gamma 1,
    kd-to-delta its own gamma, delta-mix the mixture of delta and kd, at the dense reference."""
    tuned, base, student, theta = replicated(rows=1, seed=9)
    vocab = tuned.shape[1]
    full = build_cached_targets(tuned, base, student, vocab, "target", 1.0, "mass-matched", GRID)
    for name, settings, points in (
        ("kd", {}, ((1.0, 0.0),)),
        ("delta", {}, ((1.0, 1.0),)),
        ("kd-to-delta", {"gamma": 0.5}, ((1.0, 0.5),)),
        ("delta-mix", {"mix": 0.25}, ((0.25, 1.0), (0.75, 0.0))),
    ):
        entry = OBJECTIVES[name]
        assert entry.target(entry.settings(**settings)).points == points
        exact = torch.stack(
            [math.log(s) + exact_family_target(student, tuned, base, g, 1.0) for s, g in points]
        ).logsumexp(0)
        want = (exact.exp() * (exact - torch.log_softmax(theta, -1))).sum(-1)
        got = divergence(name, theta, full, tail="bucket", cache_alpha=1.0, cache_grid=GRID,
                         **settings)  # fmt: skip
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_tails_that_need_draws_are_refused_on_a_cache_without_them():
    tuned, base, student, theta = replicated(rows=3, seed=2)
    bucket_only = build_cached_targets(tuned, base, student, 4, "target", 1.0, "mass-matched")
    for name in ("sampled", "corrected"):
        with pytest.raises(DeltakdError, match="needs a cache with drawn tail ids"):
            divergence("kd", theta, bucket_only, tail=name)
    with pytest.raises(DeltakdError, match="beta must be between 0 and 1"):
        tail_estimator("corrected", 1.5)
    with pytest.raises(DeltakdError, match="unknown tail estimator"):
        tail_estimator("bucketed")
