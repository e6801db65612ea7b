"""method/targets.py against dense references written here: plain softmax, sums over masks."""

from __future__ import annotations

import pytest
import torch

from deltakd_cli.errors import DeltakdError
from deltakd_cli.method.fidelity import (
    delta_grad_cosine,
    family_fidelity,
    family_grad_cosine,
    target_fidelity,
    total_variation,
)
from deltakd_cli.method.targets import (
    RULES_NEEDING_GRID,
    SELECTION_RULES,
    TAIL_RULES,
    CachedTargets,
    bucket_logprobs,
    build_cached_targets,
    delta_target_bucket_logits,
    delta_target_full,
    exact_delta_target,
    exact_family_target,
    family_target_bucket_logits,
    grid_column,
    kd_target_bucket_logits,
    mass_matched_tail_shift,
    select_ids,
    tail_mass,
    tail_shift,
)

# The rules that choose K for one target (the grid rule needs a grid of them).
SINGLE_TARGET_RULES = [rule for rule in SELECTION_RULES if rule not in RULES_NEEDING_GRID]


def delta_target_bucketed(cached, alpha, shift):
    """log p* over K plus the tail bucket, normalised (what delta_loss compares against)."""
    return torch.log_softmax(delta_target_bucket_logits(cached, alpha, shift), dim=-1)


def kd_target_bucketed(cached):
    return torch.log_softmax(kd_target_bucket_logits(cached), dim=-1)


def random_logprobs(seed: int, positions: int = 6, vocab: int = 97, scale: float = 3.0):
    """Independent tuned / base / student log-probs [N,V] in float64."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.log_softmax(
            scale * torch.randn(positions, vocab, generator=generator, dtype=torch.float64), -1
        )
        for _ in range(3)
    )


def complement_mask(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """True outside K, built row by row in Python (independent of scatter)."""
    mask = torch.ones(ids.shape[0], vocab, dtype=torch.bool)
    for row, kept in enumerate(ids.tolist()):
        for token in kept:
            mask[row, token] = False
    return mask


# ------------------------------------------------------------------------------------ tail mass


def test_tail_mass_matches_one_minus_sum_on_easy_cases():
    tuned, base, _ = random_logprobs(0, scale=1.0)
    ids = select_ids(tuned, base, None, 10, "tuned")
    expected = 1.0 - tuned.exp().gather(1, ids).sum(dim=1)
    torch.testing.assert_close(tail_mass(tuned, ids), expected, rtol=1e-10, atol=1e-12)
    expected_base = (base.exp() * complement_mask(ids, base.shape[1])).sum(dim=1)
    torch.testing.assert_close(tail_mass(base, ids), expected_base, rtol=1e-10, atol=1e-12)


def test_tail_mass_is_exactly_zero_when_k_covers_the_vocabulary():
    tuned, base, _ = random_logprobs(1, vocab=50)
    ids = select_ids(tuned.float(), base.float(), None, 50, "tuned")
    assert torch.equal(tail_mass(tuned.float(), ids), torch.zeros(tuned.shape[0]))


def test_tail_mass_keeps_a_tiny_tail_where_one_minus_sum_cancels():
    # K holds all but ~1e-9 of the mass: float32 1 - sum loses it, the complement sum does not.
    logits = torch.full((2, 80), -20.0, dtype=torch.float64)
    logits[:, :5] = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    logprobs = torch.log_softmax(logits, -1)
    ids = torch.arange(5).repeat(2, 1)
    reference = (logprobs.exp() * complement_mask(ids, 80)).sum(dim=1)
    assert 1e-10 < reference.max() < 1e-8
    got = tail_mass(logprobs.float(), ids)
    torch.testing.assert_close(got.double(), reference, rtol=1e-4, atol=0)
    naive = 1.0 - logprobs.float().exp().gather(1, ids).sum(dim=1)
    assert ((naive.double() - reference).abs() / reference).max() > 1e-2  # cancellation is real


# ----------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("rule", SELECTION_RULES)
@pytest.mark.parametrize("k", [1, 2, 7, 16, 97])
def test_select_ids_unique_sorted_exactly_k(rule, k):
    tuned, base, student = random_logprobs(2)
    ids = select_ids(tuned, base, student, k, rule, alpha=0.7, grid=((0.0, 0.7), (0.5, 1.3)))
    assert ids.dtype == torch.long and ids.shape == (tuned.shape[0], k)
    assert torch.all(ids[:, 1:] > ids[:, :-1])  # strictly ascending => unique
    assert ids.min() >= 0 and ids.max() < tuned.shape[1]


def test_select_ids_target_rule_is_topk_of_exact_target():
    tuned, base, student = random_logprobs(3)
    alpha = 0.8
    exact = torch.softmax(student + alpha * (tuned - base), dim=-1)  # independent of the module
    ids = select_ids(tuned, base, student, 12, "target", alpha)
    for row in range(tuned.shape[0]):
        ranked = sorted(range(tuned.shape[1]), key=lambda token: -exact[row, token].item())
        assert ids[row].tolist() == sorted(ranked[:12])


def test_select_ids_tuned_rule_is_topk_of_tuned():
    tuned, base, student = random_logprobs(4)
    ids = select_ids(tuned, base, student, 9, "tuned")
    for row in range(tuned.shape[0]):
        ranked = sorted(range(tuned.shape[1]), key=lambda token: -tuned[row, token].item())
        assert ids[row].tolist() == sorted(ranked[:9])


@pytest.mark.parametrize("rule,second", [("tuned+base", 1), ("tuned+student", 2)])
@pytest.mark.parametrize("k", [1, 8, 11])
def test_select_ids_halves_rules(rule, second, k):
    logprobs = random_logprobs(5)
    tuned, fill = logprobs[0], logprobs[second]
    ids = select_ids(*logprobs, k, rule)
    for row in range(tuned.shape[0]):
        by_tuned = sorted(range(tuned.shape[1]), key=lambda token: -tuned[row, token].item())
        head = by_tuned[: k // 2]
        rest = [t for t in sorted(range(tuned.shape[1]), key=lambda t: -fill[row, t].item())]
        rest = [t for t in rest if t not in head][: k - k // 2]
        assert set(head) <= set(ids[row].tolist())
        assert ids[row].tolist() == sorted(head + rest)


def test_halves_rule_stays_unique_when_the_fill_has_minus_inf_ids():
    # The filling distribution rules out most ids; the rule must still return k unique ids.
    tuned, base, _ = random_logprobs(6, vocab=20)
    base = base.clone()
    base[:, 3:] = float("-inf")
    base = torch.log_softmax(base, -1)
    ids = select_ids(tuned, base, None, 16, "tuned+base")
    assert ids.shape == (tuned.shape[0], 16)
    assert torch.all(ids[:, 1:] > ids[:, :-1])


def test_select_ids_rejects_bad_requests():
    tuned, base, _ = random_logprobs(7)
    with pytest.raises(DeltakdError):
        select_ids(tuned, base, None, 5, "target")
    with pytest.raises(DeltakdError):
        select_ids(tuned, base, None, 5, "tuned+student")
    with pytest.raises(DeltakdError):
        select_ids(tuned, base, None, 5, "nonsense")
    with pytest.raises(DeltakdError):
        select_ids(tuned, base, None, tuned.shape[1] + 1, "tuned")
    with pytest.raises(DeltakdError):
        select_ids(tuned, base[:, :-1], None, 5, "tuned")
    with pytest.raises(DeltakdError, match="needs the student"):
        select_ids(tuned, base, None, 5, "grid", grid=((0.5, 1.0),))
    with pytest.raises(DeltakdError, match="grid point"):
        select_ids(tuned, base, tuned, 5, "grid")


def test_select_ids_grid_rule_is_topk_of_the_max_normalised_family():
    tuned, base, student = random_logprobs(30)
    grid = ((0.0, 1.0), (0.5, 0.6), (1.0, 2.0))
    families = [  # independent of the module: the normalised family target per grid point
        torch.softmax((1 - g) * tuned + g * (student + a * (tuned - base)), dim=-1) for g, a in grid
    ]
    key = torch.stack(families).amax(dim=0)
    ids = select_ids(tuned, base, student, 10, "grid", grid=grid)
    for row in range(tuned.shape[0]):
        ranked = sorted(range(tuned.shape[1]), key=lambda token: -key[row, token].item())
        assert ids[row].tolist() == sorted(ranked[:10])
    # one grid point: gamma 1 is the target rule, gamma 0 the tuned rule
    target_ids = select_ids(tuned, base, student, 10, "target", alpha=0.6)
    assert torch.equal(select_ids(tuned, base, student, 10, "grid", grid=((1.0, 0.6),)), target_ids)
    tuned_ids = select_ids(tuned, base, student, 10, "tuned")
    assert torch.equal(select_ids(tuned, base, student, 10, "grid", grid=((0.0, 0.6),)), tuned_ids)


def test_grid_cache_stores_the_exact_family_tail_and_needs_the_student():
    tuned, base, student = random_logprobs(31)
    grid = ((0.0, 1.0), (0.5, 1.0), (1.0, 1.0))
    cached = build_cached_targets(tuned, base, student, 7, "grid", 1.0, "mass-matched", grid)
    mask = complement_mask(cached.ids, tuned.shape[1])
    for column, (gamma, alpha) in enumerate(grid):
        family = (1 - gamma) * tuned + gamma * (student + alpha * (tuned - base))
        expected = torch.logsumexp(family.masked_fill(~mask, float("-inf")), dim=-1)
        torch.testing.assert_close(cached.family_tail_logmass[:, column], expected)
    # gamma 0 and 1: the tuned tail and the mass-matched Delta tail
    torch.testing.assert_close(cached.family_tail_logmass[:, 0].exp(), cached.tuned_tail)
    torch.testing.assert_close(
        cached.family_tail_logmass[:, 2], cached.student_tail.log() + cached.target_tail_shift
    )
    assert (
        build_cached_targets(tuned, base, student, 7, "target", 1.0, "teacher").family_tail_logmass
        is None
    )
    with pytest.raises(DeltakdError, match="grid needs the student"):
        build_cached_targets(tuned, base, None, 7, "tuned", 1.0, "teacher", grid)


def test_grid_column_matches_within_float_tolerance():
    grid = ((0.0, 1.0), (0.5, 1.0), (0.5, 2.0))
    assert grid_column(grid, 0.5, 2.0) == 2
    assert grid_column(grid, 0.5 * (1 + 1e-9), 1.0) == 1
    assert grid_column(grid, 0.0, 1.0) == 0
    assert grid_column(grid, 0.25, 1.0) is None
    assert grid_column((), 1.0, 1.0) is None


# ------------------------------------------------------------------------------ building caches


def test_build_cached_targets_stores_the_values_at_k():
    tuned, base, student = random_logprobs(8)
    cached = build_cached_targets(tuned, base, student, 10, "tuned+student", 1.0, "mass-matched")
    ids = cached.ids
    torch.testing.assert_close(cached.tuned_logprobs, tuned.gather(1, ids))
    torch.testing.assert_close(cached.base_logprobs, base.gather(1, ids))
    torch.testing.assert_close(cached.student_logprobs, student.gather(1, ids))
    outside = complement_mask(ids, tuned.shape[1])
    torch.testing.assert_close(cached.tuned_tail, (tuned.exp() * outside).sum(1))
    torch.testing.assert_close(cached.base_tail, (base.exp() * outside).sum(1))
    torch.testing.assert_close(cached.student_tail, (student.exp() * outside).sum(1))
    assert cached.target_tail_shift is not None and cached.has_student


def test_build_cached_targets_without_student_and_teacher_rule():
    tuned, base, student = random_logprobs(9)
    teacher_only = build_cached_targets(tuned, base, None, 10, "tuned", 1.0, "teacher")
    assert not teacher_only.has_student
    assert teacher_only.student_tail is None and teacher_only.target_tail_shift is None
    with_student = build_cached_targets(tuned, base, student, 10, "tuned", 1.0, "teacher")
    assert with_student.has_student and with_student.target_tail_shift is None
    with pytest.raises(DeltakdError):
        build_cached_targets(tuned, base, None, 10, "tuned", 1.0, "mass-matched")
    with pytest.raises(DeltakdError):
        build_cached_targets(tuned, base, student, 10, "tuned", 1.0, "bogus")


@pytest.mark.parametrize("rule", SINGLE_TARGET_RULES)
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_mass_matched_shift_reproduces_the_exact_tail_mass(rule, alpha):
    tuned, base, student = random_logprobs(10)
    cached = build_cached_targets(tuned, base, student, 6, rule, alpha, "mass-matched")
    outside = complement_mask(cached.ids, tuned.shape[1])
    exact = torch.softmax(student + alpha * (tuned - base), dim=-1)
    exact_tail = (exact * outside).sum(1)
    shift = tail_shift(cached, alpha, cache_alpha=alpha)
    torch.testing.assert_close(shift, cached.target_tail_shift)
    full = delta_target_full(student, cached, alpha, shift).exp()
    torch.testing.assert_close((full * outside).sum(1), exact_tail, rtol=1e-9, atol=1e-12)
    # the kept ids also carry the exact target's probabilities
    torch.testing.assert_close(full.gather(1, cached.ids), exact.gather(1, cached.ids))
    bucketed = delta_target_bucketed(cached, alpha, shift).exp()
    torch.testing.assert_close(bucketed[:, -1], exact_tail, rtol=1e-9, atol=1e-12)


def test_mass_matched_shift_is_zero_for_an_empty_tail():
    tuned, base, student = random_logprobs(11, vocab=40)
    ids = torch.arange(40).repeat(tuned.shape[0], 1)
    shift = mass_matched_tail_shift(student, tuned, base, ids, 1.0)
    assert torch.equal(shift, torch.zeros_like(shift))


# --------------------------------------------------------------------------- train-time targets


def test_tail_shift_rules():
    tuned, base, student = random_logprobs(12)
    cached = build_cached_targets(tuned, base, student, 8, "target", 1.0, "mass-matched")
    teacher_rule = 0.5 * (cached.tuned_tail.log() - cached.base_tail.log())
    torch.testing.assert_close(tail_shift(cached, 1.0, 1.0), cached.target_tail_shift)
    torch.testing.assert_close(tail_shift(cached, 0.5, 1.0), teacher_rule)  # alpha differs
    torch.testing.assert_close(tail_shift(cached, 1.0, None), 2 * teacher_rule)  # unknown alpha
    # a zero tail mass in either teacher gives a shift of 0, not +-inf or NaN
    zeroed = CachedTargets(**{**cached.__dict__, "target_tail_shift": None})
    zeroed.tuned_tail = cached.tuned_tail.clone()
    zeroed.tuned_tail[0] = 0.0
    zeroed.base_tail = cached.base_tail.clone()
    zeroed.base_tail[1] = 0.0
    shift = tail_shift(zeroed, 1.0, 1.0)
    assert shift[0] == 0 and shift[1] == 0 and torch.isfinite(shift).all()


@pytest.mark.parametrize("tail_rule", TAIL_RULES)
@pytest.mark.parametrize("k", [1, 5, 30])
def test_bucketed_target_is_the_full_target_coarsened(tail_rule, k):
    tuned, base, student = random_logprobs(13)
    alpha = 0.9
    cached = build_cached_targets(tuned, base, student, k, "tuned+student", alpha, tail_rule)
    shift = tail_shift(cached, alpha, alpha)
    full = delta_target_full(student, cached, alpha, shift)
    outside = complement_mask(cached.ids, tuned.shape[1])
    coarse = torch.cat(
        [full.exp().gather(1, cached.ids), (full.exp() * outside).sum(1, keepdim=True)], dim=1
    )
    bucketed = delta_target_bucketed(cached, alpha, shift)
    torch.testing.assert_close(bucketed.exp(), coarse, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bucket_logprobs(full, cached.ids), bucketed)
    # outside K the full target is S0's own tail, scaled: l0 + shift up to the normaliser
    log_normaliser = (student + shift.unsqueeze(1) - full)[outside.bool()].reshape(len(full), -1)
    torch.testing.assert_close(log_normaliser, log_normaliser[:, :1].expand_as(log_normaliser))


def test_full_target_is_exact_when_k_covers_the_vocabulary():
    tuned, base, student = random_logprobs(14, vocab=60)
    for tail_rule in TAIL_RULES:
        cached = build_cached_targets(tuned, base, student, 60, "tuned", 1.3, tail_rule)
        shift = tail_shift(cached, 1.3, 1.3)
        exact = torch.log_softmax(student + 1.3 * (tuned - base), dim=-1)
        torch.testing.assert_close(delta_target_full(student, cached, 1.3, shift), exact)
        bucketed = delta_target_bucketed(cached, 1.3, shift)
        assert torch.isneginf(bucketed[:, -1]).all() and not torch.isnan(bucketed).any()
        torch.testing.assert_close(bucketed[:, :-1], exact)


def test_kd_target_bucketed():
    tuned, base, student = random_logprobs(15)
    cached = build_cached_targets(tuned, base, student, 7, "tuned", 1.0, "teacher")
    target = kd_target_bucketed(cached)
    outside = complement_mask(cached.ids, tuned.shape[1])
    torch.testing.assert_close(target[:, :-1], tuned.gather(1, cached.ids))
    torch.testing.assert_close(target[:, -1].exp(), (tuned.exp() * outside).sum(1))
    full_cache = build_cached_targets(tuned, base, None, tuned.shape[1], "tuned", 1.0, "teacher")
    assert torch.isneginf(kd_target_bucketed(full_cache)[:, -1]).all()


def test_exact_delta_target_and_total_variation_references():
    tuned, base, student = random_logprobs(16)
    expected = torch.log(torch.softmax(student + 0.4 * (tuned - base), dim=-1))
    torch.testing.assert_close(exact_delta_target(student, tuned, base, 0.4), expected)
    tv = total_variation(tuned, base)
    rows = (tuned.exp() - base.exp()).tolist()
    manual = torch.tensor([0.5 * sum(abs(x) for x in row) for row in rows], dtype=tv.dtype)
    torch.testing.assert_close(tv, manual)
    assert torch.allclose(
        total_variation(tuned, tuned), torch.zeros(tuned.shape[0], dtype=tuned.dtype)
    )


# ------------------------------------------------------------------------------------- fidelity


def test_delta_grad_cosine_is_the_cosine_of_autograd_gradients():
    tuned, base, student = random_logprobs(17)
    alpha = 1.0
    cached = build_cached_targets(tuned, base, student, 6, "tuned", alpha, "teacher")
    shift = tail_shift(cached, alpha, alpha)

    def grad_of_kl(target_logprobs):
        logits = student.clone().requires_grad_(True)
        kl = (target_logprobs.exp() * (target_logprobs - torch.log_softmax(logits, -1))).sum()
        return torch.autograd.grad(kl, logits)[0]

    exact_grad = grad_of_kl(torch.log_softmax(student + alpha * (tuned - base), -1))
    cached_grad = grad_of_kl(delta_target_full(student, cached, alpha, shift))
    expected = torch.nn.functional.cosine_similarity(exact_grad, cached_grad, dim=-1)
    got = delta_grad_cosine(student, tuned, base, cached, alpha, shift)
    torch.testing.assert_close(got, expected)
    assert (got < 0.999).any()  # a small teacher-only cache is measurably off


@pytest.mark.parametrize("rule", SINGLE_TARGET_RULES)
@pytest.mark.parametrize("tail_rule", TAIL_RULES)
def test_target_fidelity_is_perfect_when_k_covers_the_vocabulary(rule, tail_rule):
    tuned, base, student = random_logprobs(18, vocab=64)
    fidelity = target_fidelity(student, tuned, base, 64, rule, tail_rule, alpha=1.0)
    ones = torch.ones(tuned.shape[0], dtype=tuned.dtype)
    torch.testing.assert_close(fidelity["cosine"], ones)
    torch.testing.assert_close(fidelity["tv"], 0 * ones, atol=1e-12, rtol=0)


def test_exact_target_ids_with_mass_matched_tail_beat_tuned_ids():
    # Student and teachers put their mass in different places: the case method.md measures.
    tuned, base, student = random_logprobs(19, positions=32, vocab=200)
    best = target_fidelity(student, tuned, base, 8, "target", "mass-matched", alpha=1.0)
    tuned_only = target_fidelity(student, tuned, base, 8, "tuned", "teacher", alpha=1.0)
    assert best["cosine"].mean() > tuned_only["cosine"].mean()
    assert best["tv"].mean() < tuned_only["tv"].mean()
    # and the mass-matched tail improves on the teacher tail for the same ids
    same_ids = target_fidelity(student, tuned, base, 8, "target", "teacher", alpha=1.0)
    assert best["tv"].mean() <= same_ids["tv"].mean()


def test_float32_inputs_stay_float32_and_bfloat16_cache_is_widened():
    tuned, base, student = (t.float() for t in random_logprobs(20))
    grid = ((0.5, 1.0),)
    cached = build_cached_targets(tuned, base, student, 5, "target", 1.0, "mass-matched", grid)
    assert cached.tuned_logprobs.dtype == torch.float32
    assert cached.family_tail_logmass.dtype == torch.float32
    low = CachedTargets(
        **{
            name: (value.to(torch.bfloat16) if torch.is_floating_point(value) else value)
            for name, value in cached.__dict__.items()
            if value is not None
        }
    )
    target = delta_target_bucketed(low, 1.0, tail_shift(low, 1.0, 1.0))
    assert target.dtype == torch.float32
    torch.testing.assert_close(target.exp().sum(1), torch.ones(tuned.shape[0]))
    family = family_target_bucket_logits(
        low, 0.5, 1.0, tail_shift(low, 1.0, 1.0), low.family_tail_logmass[:, 0]
    )
    assert family.dtype == torch.float32


def test_family_grad_cosine_is_the_cosine_of_the_loss_gradients():
    # The bench's figure: the cosine between autograd gradients of the dense family KL and of
    # the cached kd-to-delta loss (its view of the bucket), both at theta = S0.
    from objective_calls import kd_to_delta_loss

    tuned, base, student = random_logprobs(32, positions=8, vocab=120)
    grid = ((0.0, 1.0), (0.5, 1.0), (1.0, 1.0))
    cached = build_cached_targets(tuned, base, student, 8, "grid", 1.0, "mass-matched", grid)
    for column, (gamma, alpha) in enumerate(grid):
        logits = student.clone().requires_grad_(True)
        exact = exact_family_target(student, tuned, base, gamma, alpha)
        dense = (exact.exp() * (exact - torch.log_softmax(logits, -1))).sum()
        (dense_grad,) = torch.autograd.grad(dense, logits)
        logits = student.float().clone().requires_grad_(True)
        sparse = kd_to_delta_loss(logits, cached, gamma, alpha, 1.0, 1.0, None, grid, tail="bucket")
        (sparse_grad,) = torch.autograd.grad(sparse.sum(), logits)
        expected = torch.nn.functional.cosine_similarity(dense_grad, sparse_grad.double(), dim=-1)
        shift = tail_shift(cached, alpha, 1.0)
        got = family_grad_cosine(
            student, tuned, base, cached, gamma, alpha, shift, cached.family_tail_logmass[:, column]
        )
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert (got < 0.9999).any()  # k = 8 of 120: measurably off


def test_family_fidelity_is_perfect_when_k_covers_the_vocabulary():
    tuned, base, student = random_logprobs(33, vocab=64)
    grid = ((0.0, 1.0), (0.5, 1.0), (1.0, 0.5))
    figures = family_fidelity(student, tuned, base, 64, grid)
    assert list(figures) == list(grid)
    ones = torch.ones(tuned.shape[0], dtype=tuned.dtype)
    for figure in figures.values():
        torch.testing.assert_close(figure["cosine"], ones)
        torch.testing.assert_close(figure["cosine_fallback"], ones)
