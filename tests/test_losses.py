"""The objectives' losses (method/divergences.py over method/view.py's target view, and
train/objective.py's chunk_loss) against dense full-vocabulary references written here
(log_softmax, KL, autograd)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from objective_calls import (
    delta_loss,
    delta_mix_loss,
    delta_mse_loss,
    divergence,
    kd_loss,
    kd_to_delta_loss,
)

from deltakd_cli.errors import DeltakdError
from deltakd_cli.method.divergences import kl_terms, sft_loss
from deltakd_cli.method.objectives import OBJECTIVES, FamilySettings, MixSettings
from deltakd_cli.method.spec import CacheFacts, tail_estimator
from deltakd_cli.method.targets import (
    STUDENT_FIELDS,
    CachedTargets,
    TailDraws,
    bucket_logprobs,
    build_cached_targets,
    delta_target_full,
    exact_family_target,
    family_target_bucket_logits,
    kd_target_bucket_logits,
    tail_shift,
)
from deltakd_cli.train.objective import chunk_loss

POSITIONS = 7
VOCAB = 83


def random_logits(seed: int, vocab: int = VOCAB, scale: float = 2.5):
    """Independent float32 logits: tuned teacher, base teacher, S0, the student being trained."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(POSITIONS, vocab, generator=generator) for _ in range(4))


def cache_from_logits(
    tuned_logits,
    base_logits,
    student0_logits,
    k,
    rule="target",
    alpha=1.0,
    tail="mass-matched",
    grid=(),
    samples=0,
):
    """The cache of these logits (with `samples` tail draws per position: each position its own
    example, so their draws are independent)."""
    log_softmax = torch.log_softmax
    draws = None
    if samples:
        positions = tuned_logits.shape[0]
        draws = TailDraws(samples, 0, torch.arange(positions), torch.zeros(positions).long())
    return build_cached_targets(
        log_softmax(tuned_logits, -1),
        log_softmax(base_logits, -1),
        log_softmax(student0_logits, -1) if student0_logits is not None else None,
        k,
        rule,
        alpha,
        tail,
        grid,
        draws,
    )


def without_student(cached):
    """The cache with the base student's own fields taken out: what a live S0 supplies."""
    return CachedTargets(**{**cached.__dict__, **dict.fromkeys(STUDENT_FIELDS)})


def dense_kl(target_logprobs, student_logprobs):
    """KL(target || student) per row over the whole vocabulary (all entries finite here)."""
    return (target_logprobs.exp() * (target_logprobs - student_logprobs)).sum(-1)


def value_and_grad(loss_fn, logits):
    """Per-position values and the gradient of their sum with respect to the student logits."""
    logits = logits.detach().clone().requires_grad_(True)
    values = loss_fn(logits)
    (grad,) = torch.autograd.grad(values.sum(), logits)
    return values.detach(), grad


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- k = |V|: exact equality


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_kd_with_a_full_cache_equals_dense_kd(temperature):
    tuned, base, student0, student = random_logits(0)
    cached = cache_from_logits(tuned, base, student0, VOCAB, rule="tuned", tail="teacher")
    assert torch.all(cached.tuned_tail == 0)

    def reference(logits):
        target = torch.log_softmax(tuned / temperature, -1)
        return dense_kl(target, torch.log_softmax(logits / temperature, -1))

    got = value_and_grad(lambda z: kd_loss(z, cached, temperature), student)
    want = value_and_grad(reference, student)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


@pytest.mark.parametrize("tail", ["mass-matched", "teacher"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("path", ["bucketed", "frozen"])
def test_delta_with_a_full_cache_equals_dense_delta(tail, temperature, path):
    tuned, base, student0, student = random_logits(1)
    alpha = 0.8
    cached = cache_from_logits(tuned, base, student0, VOCAB, alpha=alpha, tail=tail)
    frozen = student0 if path == "frozen" else None

    def reference(logits):
        target = torch.log_softmax((student0 + alpha * (tuned - base)) / temperature, -1)
        return dense_kl(target, torch.log_softmax(logits / temperature, -1))

    got = value_and_grad(
        lambda z: delta_loss(z, cached, alpha, temperature, alpha, frozen_student_logits=frozen),
        student,
    )
    want = value_and_grad(reference, student)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
def test_delta_mix_with_a_full_cache_equals_dense_mixture(mix):
    tuned, base, student0, student = random_logits(2)
    cached = cache_from_logits(tuned, base, student0, VOCAB)

    def reference(logits):
        delta_target = torch.softmax(student0 + (tuned - base), -1)
        target = mix * delta_target + (1 - mix) * torch.softmax(tuned, -1)
        return dense_kl(target.log(), torch.log_softmax(logits, -1))

    got = value_and_grad(lambda z: delta_mix_loss(z, cached, 1.0, 1.0, 1.0, mix=mix), student)
    want = value_and_grad(reference, student)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


def test_delta_mse_equals_dense_reference_on_both_paths():
    tuned, base, student0, student = random_logits(3)
    alpha = 0.6
    cached = cache_from_logits(tuned, base, student0, 12, rule="tuned+student", alpha=alpha)

    def reference(logits):
        ids = cached.ids
        own = torch.log_softmax(logits, -1) - torch.log_softmax(student0, -1)
        wanted = alpha * (torch.log_softmax(tuned, -1) - torch.log_softmax(base, -1))
        return ((own - wanted).gather(1, ids) ** 2).mean(-1)

    want = value_and_grad(reference, student)
    for frozen in (None, student0):
        got = value_and_grad(lambda z, f=frozen: delta_mse_loss(z, cached, alpha, f), student)
        assert_close(got[0], want[0])
        assert_close(got[1], want[1])
    # a student whose log-probs moved by alpha*Delta plus a constant c scores c^2
    full = cache_from_logits(tuned, base, student0, VOCAB, alpha=alpha)
    moved = torch.log_softmax(student0, -1) + alpha * (
        torch.log_softmax(tuned, -1) - torch.log_softmax(base, -1)
    )
    constant = torch.logsumexp(moved, -1)
    assert_close(delta_mse_loss(moved, full, alpha), constant**2)


# -------------------------------------------------- the live S0 and the cached S0: one computation


@pytest.mark.parametrize("k", [1, 4, 20])
@pytest.mark.parametrize("tail", ["mass-matched", "teacher"])
@pytest.mark.parametrize("cache_alpha", [1.0, 0.5])
def test_at_s0_the_bucket_gradient_is_p0_minus_the_full_target(k, tail, cache_alpha):
    # At theta = S0 the student's tail already has S0's shape, so the bucket loses nothing: the
    # gradient is p0 - p* with p* the full target of the same tail shift, on both S0 routes.
    tuned, base, student0, _ = random_logits(4)
    alpha = 1.0  # cache_alpha 0.5 makes the mass-matched cache fall back to the teacher tail
    cached = cache_from_logits(tuned, base, student0, k, rule="tuned", alpha=cache_alpha, tail=tail)
    bucketed = value_and_grad(lambda z: delta_loss(z, cached, alpha, 1.0, cache_alpha), student0)
    frozen = value_and_grad(
        lambda z: delta_loss(z, cached, alpha, 1.0, cache_alpha, frozen_student_logits=student0),
        student0,
    )
    assert_close(bucketed[0], frozen[0])
    assert_close(bucketed[1], frozen[1])
    shift = tail_shift(cached, alpha, cache_alpha)
    target = delta_target_full(torch.log_softmax(student0, -1), cached, alpha, shift)
    assert_close(bucketed[1], torch.softmax(student0, -1) - target.exp())


def test_the_bucket_is_the_coarsened_full_kl_away_from_s0():
    # Away from S0 the bucketed KL only sees the tail's total mass: it is the KL to the full
    # target (l0 + the mass-matched shift outside K) minus the (non-negative) mismatch of
    # shapes within the tail.
    tuned, base, student0, student = random_logits(5)
    cached = cache_from_logits(tuned, base, student0, 6)
    bucketed = delta_loss(student, cached, 1.0, 1.0, 1.0)
    shift = tail_shift(cached, 1.0, 1.0)
    target = delta_target_full(torch.log_softmax(student0, -1), cached, 1.0, shift)
    full = dense_kl(target, torch.log_softmax(student, -1))
    assert torch.all(full >= bucketed - 1e-5)
    assert torch.all(full - bucketed > 1e-3)


S0_OBJECTIVES = [
    ("delta", {}),
    ("delta-mse", {}),
    ("delta-mix", {"mix": 0.4}),
    ("kd-to-delta", {"gamma": 0.4}),
    ("kd-to-delta", {"gamma": 1.0}),
]


@pytest.mark.parametrize("estimator", ["bucket", "sampled", "corrected"])
@pytest.mark.parametrize(("objective", "settings"), S0_OBJECTIVES)
def test_live_and_cached_s0_give_the_same_loss_anywhere(objective, settings, estimator):
    # The live S0 only supplies the base student's fields (l0 at K and at the draws, its tail
    # mass): with the cache's S0 as the live one, both routes are one computation, in value and
    # gradient, for a student far from S0, on every tail.
    tuned, base, student0, student = random_logits(26)
    cached = cache_from_logits(tuned, base, student0, 7, rule="grid", grid=GRID, samples=6)
    live_only = without_student(cached)
    takes_temperature = OBJECTIVES[objective].takes_temperature
    temperature = 1.5 if estimator == "bucket" and takes_temperature else 1.0  # draws: at 1

    def loss(cache, frozen):
        return lambda z: divergence(
            objective, z, cache, tail=estimator, temperature=temperature, cache_alpha=1.0,
            cache_grid=GRID, frozen_student_logits=frozen, **settings,
        )  # fmt: skip

    cached_route = value_and_grad(loss(cached, None), student)
    live_route = value_and_grad(loss(live_only, student0), student)
    assert_close(live_route[0], cached_route[0])
    assert_close(live_route[1], cached_route[1])
    assert (cached_route[0].abs() > 1e-3).all()  # far from S0: not a vacuous zero
    # and the live route reads the live S0: another one gives another loss
    other = value_and_grad(loss(live_only, student0 + 0.5 * student), student)
    assert not torch.allclose(other[1], live_route[1], atol=1e-4)


def test_alpha_differing_from_the_cache_falls_back_to_the_teacher_tail():
    tuned, base, student0, student = random_logits(6)
    matched = cache_from_logits(tuned, base, student0, 8, alpha=1.0, tail="mass-matched")
    teacher = CachedTargets(**{**matched.__dict__, "target_tail_shift": None})
    same = delta_loss(student, matched, 0.5, 1.0, cache_alpha=1.0)
    assert_close(same, delta_loss(student, teacher, 0.5, 1.0, cache_alpha=1.0))
    # at the cache's own alpha the stored mass-matched shift is used, and it changes the loss
    assert not torch.allclose(
        delta_loss(student, matched, 1.0, 1.0, cache_alpha=1.0),
        delta_loss(student, teacher, 1.0, 1.0, cache_alpha=1.0),
    )


# ---------------------------------------------------------------------------- chunk_loss


def test_sft_loss_equals_cross_entropy():
    *_, student = random_logits(7)
    labels = torch.randint(0, VOCAB, (POSITIONS,), generator=torch.Generator().manual_seed(7))
    expected = -torch.log_softmax(student, -1).gather(1, labels[:, None]).squeeze(1)
    assert_close(sft_loss(student, labels), expected)
    assert_close(sft_loss(student, labels), F.cross_entropy(student, labels, reduction="none"))


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("sft_weight", [0.0, 0.25, 1.0])
def test_chunk_loss_combines_sft_and_distill(objective, sft_weight):
    tuned, base, student0, student = random_logits(8)
    cached = cache_from_logits(tuned, base, student0, 10)
    labels = torch.arange(POSITIONS)
    temperature = 1.0 if objective == "delta-mse" else 2.0
    values = {"alpha": 1.0, "mix": 0.4, "gamma": 0.3, "beta": 0.4, "skew": 0.2}
    settings = OBJECTIVES[objective].settings_from(values)
    out = chunk_loss(
        objective,
        student,
        labels,
        cached,
        settings=settings,
        temperature=temperature,
        sft_weight=sft_weight,
        facts=CacheFacts(alpha=1.0),
    )
    sft = F.cross_entropy(student, labels, reduction="none")
    assert_close(out["sft"], sft)
    if objective == "sft":
        assert torch.equal(out["distill"], torch.zeros(POSITIONS))
        assert_close(out["loss"], sft)
        return
    # the teacher's divergences: their definitions over K + one tail bucket, written here
    teacher = torch.log_softmax(kd_target_bucket_logits(cached) / temperature, -1)
    own = bucket_logprobs(torch.log_softmax(student / temperature, -1), cached.ids)
    setting = {"gjsd": 0.4, "skew-kl": 0.2}.get(objective)
    expected_distill = {
        "kd": lambda: kd_loss(student, cached, temperature),
        "delta": lambda: delta_loss(student, cached, 1.0, temperature, 1.0),
        "delta-mse": lambda: delta_mse_loss(student, cached, 1.0),
        "delta-mix": lambda: delta_mix_loss(student, cached, 1.0, temperature, 1.0, mix=0.4),
        "kd-to-delta": lambda: kd_to_delta_loss(student, cached, 0.3, 1.0, temperature, 1.0),
    }.get(objective, lambda: dense_divergence(objective, teacher, own, setting))()
    assert_close(out["distill"], expected_distill)
    combined = sft_weight * sft + (1 - sft_weight) * expected_distill * temperature**2
    assert_close(out["loss"], combined)


def test_chunk_loss_trains_the_tail_it_is_given():
    # A cache with draws: the tail estimator is the caller's (the bucket when none is given),
    # never inferred from the cache.
    tuned, base, student0, student = random_logits(14)
    cached = cache_from_logits(tuned, base, student0, 10, samples=8)
    labels = torch.zeros(POSITIONS, dtype=torch.long)
    facts = CacheFacts(alpha=1.0)
    for name in ("bucket", "sampled", "corrected"):
        out = chunk_loss(
            "delta", student, labels, cached, tail=tail_estimator(name, 0.5), facts=facts
        )
        want = delta_loss(student, cached, 1.0, 1.0, 1.0, tail=name, tail_beta=0.5)
        assert_close(out["distill"], want)
    default = chunk_loss("delta", student, labels, cached, facts=facts)["distill"]
    assert_close(default, delta_loss(student, cached, 1.0, 1.0, 1.0, tail="bucket"))
    assert not torch.allclose(default, delta_loss(student, cached, 1.0, 1.0, 1.0, tail="sampled"))


def test_temperature_one_is_the_default_and_matters_otherwise():
    tuned, base, student0, student = random_logits(9)
    cached = cache_from_logits(tuned, base, student0, 10)
    labels = torch.zeros(POSITIONS, dtype=torch.long)
    facts = CacheFacts(alpha=1.0)
    for objective in ("kd", "delta", "delta-mix"):
        default = chunk_loss(objective, student, labels, cached, facts=facts)
        explicit = chunk_loss(objective, student, labels, cached, temperature=1.0, facts=facts)
        hot = chunk_loss(objective, student, labels, cached, temperature=3.0, facts=facts)
        assert torch.equal(default["loss"], explicit["loss"])
        assert not torch.allclose(default["distill"], hot["distill"])


def test_delta_mix_endpoints_are_delta_and_kd():
    tuned, base, student0, student = random_logits(10)
    cached = cache_from_logits(tuned, base, student0, 9)
    for temperature in (1.0, 1.5):
        assert_close(
            delta_mix_loss(student, cached, 1.0, temperature, 1.0, mix=1.0),
            delta_loss(student, cached, 1.0, temperature, 1.0),
        )
        assert_close(
            delta_mix_loss(student, cached, 1.0, temperature, 1.0, mix=0.0),
            kd_loss(student, cached, temperature),
        )


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("frozen", [False, True])
def test_zero_tails_give_finite_values_and_gradients(objective, frozen):
    tuned, base, student0, student = random_logits(11)
    for tail in ("mass-matched", "teacher"):
        cached = cache_from_logits(tuned, base, student0, VOCAB, tail=tail)
        assert torch.all(cached.tuned_tail == 0) and torch.all(cached.student_tail == 0)
        logits = student.clone().requires_grad_(True)
        out = chunk_loss(
            objective,
            logits,
            torch.zeros(POSITIONS, dtype=torch.long),
            cached,
            sft_weight=0.3,
            facts=CacheFacts(alpha=1.0),
            frozen_student_logits=student0 if frozen else None,
        )
        (grad,) = torch.autograd.grad(out["loss"].sum(), logits)
        for value in (*out.values(), grad):
            assert torch.isfinite(value).all()


def test_kl_terms_ignore_zero_probability_entries():
    target = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    student = torch.tensor([[-0.1, float("-inf"), -2.0]], requires_grad=True)
    value = kl_terms(target, student).sum(-1)
    (grad,) = torch.autograd.grad(value.sum(), student)
    assert_close(value, torch.tensor([0.1]))
    assert torch.isfinite(grad).all()


def test_bfloat16_student_logits_compute_in_float32():
    tuned, base, student0, student = random_logits(12)
    cached = cache_from_logits(tuned, base, student0, 10)
    low = student.to(torch.bfloat16)
    out = chunk_loss("delta", low, torch.zeros(POSITIONS, dtype=torch.long), cached)
    assert out["loss"].dtype == torch.float32
    assert_close(out["distill"], delta_loss(low.float(), cached, 1.0, 1.0, None))


def test_the_objective_registry():
    assert not OBJECTIVES["sft"].needs_cache and OBJECTIVES["sft"].divergence_function() is None
    assert all(OBJECTIVES[name].needs_cache for name in OBJECTIVES if name != "sft")
    assert {n for n, o in OBJECTIVES.items() if o.needs_student} == {
        "delta", "delta-mse", "delta-mix", "kd-to-delta",
    }  # fmt: skip
    # and an objective needs the student exactly when its target leaves the teacher
    for name, entry in OBJECTIVES.items():
        if entry.needs_cache:
            assert entry.target(entry.settings()).needs_student == entry.needs_student, name
    assert [o.label for o in OBJECTIVES.values()][:3] == [
        "SFT student", "KD student", "Delta-KD student",
    ]  # fmt: skip
    assert not OBJECTIVES["delta-mse"].takes_temperature
    with pytest.raises(DeltakdError, match="unknown objective 'ce'"):
        chunk_loss("ce", torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), None)


def test_chunk_loss_rejects_bad_input():
    tuned, base, student0, student = random_logits(13)
    labels = torch.zeros(POSITIONS, dtype=torch.long)
    with_student = cache_from_logits(tuned, base, student0, 10)
    teacher_only = cache_from_logits(tuned, base, None, 10, rule="tuned", tail="teacher")
    drawn = cache_from_logits(tuned, base, student0, 10, samples=4)
    sampled = tail_estimator("sampled")
    bad_calls = [
        dict(objective="kd", cached=None),
        dict(objective="delta", cached=teacher_only),
        dict(objective="delta-mse", cached=teacher_only),
        dict(objective="delta-mix", cached=teacher_only),
        dict(objective="delta-mse", cached=with_student, temperature=2.0),
        dict(objective="kd-to-delta", cached=teacher_only),
        dict(objective="kd", cached=with_student, temperature=0.0),
        dict(objective="kd", cached=with_student, sft_weight=-0.1),
        dict(objective="nope", cached=with_student),
        dict(objective="kd", cached=with_student[:3]),
        dict(objective="kd", cached=with_student, tail=sampled),  # no draws to sample with
        # draws made at the cache's temperature (1) serve no other
        dict(objective="kd", cached=drawn, tail=sampled, temperature=2.0),
        dict(objective="kd", cached=drawn, tail=tail_estimator("corrected"), temperature=2.0),
    ]
    for call in bad_calls:
        objective = call.pop("objective")
        cached = call.pop("cached")
        with pytest.raises(DeltakdError):
            chunk_loss(objective, student, labels, cached, **call)
    # the teacher-only cache works once the frozen student is given
    out = chunk_loss(
        "delta", student, labels, teacher_only, frozen_student_logits=student0,
        facts=CacheFacts(alpha=1.0),
    )  # fmt: skip
    assert torch.isfinite(out["loss"]).all()


@pytest.mark.parametrize(
    ("objective", "settings"),
    [
        ("delta-mix", MixSettings(mix=1.5)),
        ("delta-mix", MixSettings(mix=-0.5)),
        ("kd-to-delta", FamilySettings(gamma=1.5)),
        ("kd-to-delta", FamilySettings(gamma=-0.1)),
    ],
)
def test_chunk_loss_refuses_settings_out_of_their_range(objective, settings):
    # A mix or gamma outside [0, 1] is no point of the family (a mix of 1.5 would weigh the
    # teacher by -0.5): refused in one line, as `distill` refuses the flag.
    tuned, base, student0, student = random_logits(15)
    cached = cache_from_logits(tuned, base, student0, 10)
    labels = torch.zeros(POSITIONS, dtype=torch.long)
    with pytest.raises(DeltakdError):
        chunk_loss(objective, student, labels, cached, settings=settings)


# ------------------------------------------------------------- kd-to-delta: the gamma family

GRID = ((0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.3, 0.7), (0.8, 2.0))


def exactly_equal(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("path", ["bucketed", "frozen"])
def test_kd_to_delta_at_gamma_zero_is_kd(temperature, path):
    tuned, base, student0, student = random_logits(20)
    cached = cache_from_logits(tuned, base, student0, 9)
    frozen = student0 if path == "frozen" else None
    got = value_and_grad(
        lambda z: kd_to_delta_loss(z, cached, 0.0, 1.0, temperature, 1.0, frozen), student
    )
    want = value_and_grad(lambda z: kd_loss(z, cached, temperature), student)
    exactly_equal(got[0], want[0])
    exactly_equal(got[1], want[1])
    # with the grid's stored tail at gamma 0 (log mT, summed at cache time): the same up to rounding
    with_grid = cache_from_logits(tuned, base, student0, 9, rule="target", grid=GRID)
    stored = value_and_grad(
        lambda z: kd_to_delta_loss(z, with_grid, 0.0, 1.0, temperature, 1.0, frozen, GRID), student
    )
    assert_close(stored[0], want[0])
    assert_close(stored[1], want[1])


@pytest.mark.parametrize("tail", ["mass-matched", "teacher"])
@pytest.mark.parametrize("cache_alpha", [1.0, 0.5])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_to_delta_at_gamma_one_is_bucketed_delta(tail, cache_alpha, temperature):
    tuned, base, student0, student = random_logits(21)
    cached = cache_from_logits(tuned, base, student0, 9, alpha=cache_alpha, tail=tail)
    got = value_and_grad(
        lambda z: kd_to_delta_loss(z, cached, 1.0, 1.0, temperature, cache_alpha), student
    )
    want = value_and_grad(lambda z: delta_loss(z, cached, 1.0, temperature, cache_alpha), student)
    exactly_equal(got[0], want[0])
    exactly_equal(got[1], want[1])


def test_the_stored_tail_at_gamma_one_is_the_mass_matched_delta_tail():
    tuned, base, student0, student = random_logits(22)
    cached = cache_from_logits(tuned, base, student0, 9, rule="grid", grid=GRID)
    got = value_and_grad(
        lambda z: kd_to_delta_loss(z, cached, 1.0, 1.0, 1.0, 1.0, None, GRID), student
    )
    want = value_and_grad(lambda z: delta_loss(z, cached, 1.0, 1.0, 1.0), student)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


@pytest.mark.parametrize("point", GRID)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("path", ["bucketed", "frozen"])
@pytest.mark.parametrize("tail", ["stored", "fallback"])
def test_kd_to_delta_with_a_full_cache_equals_dense_family(point, temperature, path, tail):
    gamma, alpha = point
    tuned, base, student0, student = random_logits(23)
    cached = cache_from_logits(tuned, base, student0, VOCAB, rule="grid", grid=GRID)
    assert cached.family_tail_logmass.shape == (POSITIONS, len(GRID))
    frozen = student0 if path == "frozen" else None
    grid = GRID if tail == "stored" else ()
    lT, lB, l0 = (torch.log_softmax(z, -1) for z in (tuned, base, student0))

    def reference(logits):
        family = (1 - gamma) * lT + gamma * (l0 + alpha * (lT - lB))
        target = torch.log_softmax(family / temperature, -1)
        return dense_kl(target, torch.log_softmax(logits / temperature, -1))

    got = value_and_grad(
        lambda z: kd_to_delta_loss(z, cached, gamma, alpha, temperature, 1.0, frozen, grid),
        student,
    )
    want = value_and_grad(reference, student)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.8])
def test_stored_family_tail_is_exact_and_the_fallback_an_upper_bound(gamma):
    # k < |V|: with the stored tail the bucket target is the exact family coarsened to K + tail;
    # the fallback's tail logit is never below the exact one (Hölder, mass-matched Delta tail).
    tuned, base, student0, _ = random_logits(24)
    grid = ((gamma, 1.0),)
    cached = cache_from_logits(tuned, base, student0, 6, rule="grid", grid=grid)
    lT, lB, l0 = (torch.log_softmax(z, -1) for z in (tuned, base, student0))
    shift = tail_shift(cached, 1.0, 1.0)
    exact = bucket_logprobs(exact_family_target(l0, lT, lB, gamma, 1.0), cached.ids)
    stored = family_target_bucket_logits(
        cached, gamma, 1.0, shift, cached.family_tail_logmass[:, 0]
    )
    assert_close(torch.log_softmax(stored, -1), exact)
    fallback = family_target_bucket_logits(cached, gamma, 1.0, shift)
    assert torch.all(fallback[:, -1] >= stored[:, -1] - 1e-5)
    assert torch.all(fallback[:, -1] - stored[:, -1] > 1e-4)  # a bound, not an equality here
    exactly_equal(fallback[:, :-1], stored[:, :-1])


def test_kd_to_delta_finds_its_grid_point_within_float_tolerance():
    tuned, base, student0, student = random_logits(25)
    cached = cache_from_logits(tuned, base, student0, 6, rule="grid", grid=GRID)
    shift = tail_shift(cached, 1.0, 1.0)
    stored = family_target_bucket_logits(cached, 0.5, 1.0, shift, cached.family_tail_logmass[:, 1])
    fallback = family_target_bucket_logits(cached, 0.5, 1.0, shift)
    student_buckets = torch.log_softmax(student, -1)
    student_buckets = bucket_logprobs(student_buckets, cached.ids)
    with_stored = kl_terms(torch.log_softmax(stored, -1), student_buckets).sum(-1)
    with_fallback = kl_terms(torch.log_softmax(fallback, -1), student_buckets).sum(-1)
    near = kd_to_delta_loss(student, cached, 0.5 + 1e-9, 1.0 - 1e-9, 1.0, 1.0, None, GRID)
    assert_close(near, with_stored)
    # a grid without the point, or a batch without the stored tails: the fallback
    assert_close(kd_to_delta_loss(student, cached, 0.5, 1.0, 1.0, 1.0, None, ()), with_fallback)
    without = CachedTargets(**{**cached.__dict__, "family_tail_logmass": None})
    assert_close(kd_to_delta_loss(student, without, 0.5, 1.0, 1.0, 1.0, None, GRID), with_fallback)
    assert not torch.allclose(with_stored, with_fallback)


# ------------------------------------------- reverse KL, generalised JSD, skew KL, total variation


def dense_divergence(name, target, student, setting):
    """The divergence over the whole vocabulary, written from its definition (r: the tuned
    teacher, p: the student; both log-probs [N,V], all finite here)."""
    r, p = target.exp(), student.exp()

    def kl(a, b):  # KL(a || b) from probabilities
        return (a * (a.log() - b.log())).sum(-1)

    if name == "reverse-kl":
        return kl(p, r)
    if name == "gjsd":
        if setting == 0:
            return kl(r, p)
        if setting == 1:
            return kl(p, r)
        m = setting * r + (1 - setting) * p
        return setting * kl(r, m) + (1 - setting) * kl(p, m)
    if name == "skew-kl":
        return kl(r, setting * r + (1 - setting) * p)
    return 0.5 * (r - p).abs().sum(-1)


NEW_DIVERGENCES = [
    ("reverse-kl", None),
    ("gjsd", 0.0),
    ("gjsd", 0.3),
    ("gjsd", 1.0),
    ("skew-kl", 0.0),
    ("skew-kl", 0.1),
    ("tv", None),
]


def registered(name, setting):
    """The objective's registered divergence over its view of the cache (the bucket), as
    `distill` takes it per chunk."""
    settings = {key: setting for key in ("beta", "skew") if key in OBJECTIVES[name].reads}
    return lambda z, cached, temperature: divergence(
        name, z, cached, tail="bucket", temperature=temperature, **settings
    )


@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize(("name", "setting"), NEW_DIVERGENCES)
def test_new_divergences_with_a_full_cache_equal_their_dense_definitions(
    name, setting, temperature
):
    tuned, base, student0, student = random_logits(21)
    cached = cache_from_logits(tuned, base, student0, VOCAB, rule="tuned", tail="teacher")
    loss = registered(name, setting)
    # the cache stores log-probs in float16: the reference reads the same stored values
    stored_tuned = cached.tuned_logprobs.float().gather(1, cached.ids.argsort(dim=1))

    def reference(logits):
        target = torch.log_softmax(stored_tuned / temperature, -1)
        return dense_divergence(name, target, torch.log_softmax(logits / temperature, -1), setting)

    got = value_and_grad(lambda z: loss(z, cached, temperature), student)
    want = value_and_grad(reference, student)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    assert (got[0] > 0).all()  # not a vacuous zero


@pytest.mark.parametrize(("name", "setting"), NEW_DIVERGENCES)
def test_new_divergences_over_k_plus_the_bucket_bound_the_full_one_from_below(name, setting):
    """Coarsening to K + one tail bucket can only lose divergence (data processing, for every
    f-divergence; docs/method.md says so): the bucket value is at most the dense one."""
    tuned, base, student0, student = random_logits(22)
    cached = cache_from_logits(tuned, base, student0, 6, rule="tuned", tail="teacher")
    bucketed = registered(name, setting)(student, cached, 1.0)
    full = cache_from_logits(tuned, base, student0, VOCAB, rule="tuned", tail="teacher")
    dense = registered(name, setting)(student, full, 1.0)
    assert (bucketed <= dense + 1e-5).all()
    assert (bucketed < dense - 1e-4).any()  # and it is a real loss, not equality
