"""The target view: one chunk's target on the columns its loss touches, built in one place from
the cached targets, the optional live base student S0 and the tail estimator.

Every objective is a divergence over a view (divergences.py). The view holds

    K          the kept ids, where the target is exact: log r at K
    the tail   the target's log-mass outside K, log m_r (the bucket)
    the draws  ids drawn from a proposal q over the tail, log r there, and their inclusion
               weights c_j / (M q(j)) (only for the tail estimators that use the draws)

and the tail estimator (`Tail`) decides how the tail enters the loss. For a divergence that is a
sum over the vocabulary of per-token terms f(r(y), p_theta(y)), with f positively homogeneous of
degree 1 (every f-divergence: forward and reverse KL, the generalised JSD, skew KL, total
variation), the three estimators are:

    bucket     sum_K f + f(m_r, m_theta): the divergence of the distributions coarsened to
               K + one tail bucket. Quiet, biased: it trains the tail's mass, never its shape.
    sampled    sum_K f + sum_j w_j f(r_j, p_j): unbiased (E[sum_j w_j g_j] = sum_tail g for any g),
               noisy: its noise is of the order of the tail's mass.
    corrected  the bucket plus a sampled correction of what the bucket gets wrong (a control
               variate): with b(y) = beta m_r p_theta(y) / m_theta on the tail (the student's own
               tail shape carrying beta of the target's tail mass, held constant),

                   sum_K f + f(beta m_r, m_theta) + sum_j w_j [f(r_j, p_j) - f(b_j, p_j)].

               f(beta m_r, m_theta) = sum_tail f(b, p_theta) by homogeneity, so the expectation
               is the full sum: unbiased in value, and in gradient too (holding b constant moves
               the gradient by sum_tail d_b f(b, p) db, and d_b f is constant over the tail where
               b is proportional to p_theta, while sum_tail db = d(beta m_r) = 0). Its noise
               vanishes where the target's tail is proportional to the student's. beta 0 is the
               sampled estimator exactly (the same computation), beta 1 the full correction.

docs/method.md derives these and gives the measured default per objective. Pure tensor math, no
I/O; the only module that knows how the tail is estimated."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from deltakd_cli.errors import DeltakdError
from deltakd_cli.method import sampling
from deltakd_cli.method.spec import CacheFacts, Tail, TargetSpec
from deltakd_cli.method.targets import (
    CachedTargets,
    complement_logsumexp,
    drawn_family_logits,
    exact_family_log_tail,
    family_logits_full,
    family_target_bucket_logits,
    sample_log_weights,
    tail_mass,
    tail_shift,
)


@dataclass(frozen=True)
class TargetView:
    """One chunk's target over N positions (log-probs at temperature tau, normalised over the
    whole vocabulary):

    ids [N,k], head [N,k]: K and log r there; tail [N]: log m_r, r's log-mass outside K;
    drawn_ids, drawn, drawn_log_weights [N,M]: the draws, log r there and log(c_j / (M q(j)))
    (None when the tail estimator uses no draws); baseline: the tail estimator's share of the
    bucket; head_logits [N,k]: the single point's unnormalised target logits at K (delta-mse
    reads them); ess [N]: the effective sample size of self-normalised weights (None where the
    cache knows the target's normaliser and the weights are plain)."""

    ids: torch.Tensor
    head: torch.Tensor
    tail: torch.Tensor
    baseline: float
    drawn_ids: torch.Tensor | None = None
    drawn: torch.Tensor | None = None
    drawn_log_weights: torch.Tensor | None = None
    head_logits: torch.Tensor | None = None
    ess: torch.Tensor | None = None


@dataclass(frozen=True)
class StudentView:
    """The student's log-probs (at temperature tau) where the view needs them: at K, its
    log-mass outside K (when the view has a bucket), at the drawn ids."""

    head: torch.Tensor
    tail: torch.Tensor | None
    drawn: torch.Tensor | None


# ---------------------------------------------------------------------------------------------
# Building the view
# ---------------------------------------------------------------------------------------------


def with_live_student(
    cached: CachedTargets, frozen_student_logits: torch.Tensor, temperature: float = 1.0
) -> CachedTargets:
    """`cached` with the base student's fields (log-probs at K and at the drawn ids, tail mass)
    taken from a live frozen S0's logits at `temperature` (the cache's)."""
    frozen = torch.log_softmax(frozen_student_logits.detach().float() / temperature, dim=-1)
    changes = {
        "student_logprobs": frozen.gather(1, cached.ids),
        "student_tail": tail_mass(frozen, cached.ids),
    }
    if cached.has_samples:
        changes["sample_student_logprobs"] = frozen.gather(1, cached.sample_ids.long())
    return replace(cached, **changes)


def _point(
    cached: CachedTargets,
    gamma: float,
    alpha: float,
    tail: Tail,
    facts: CacheFacts,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """One family point's (log r at K, log m_r, log r at the draws, the unnormalised logits at
    K, the self-normalised weights' ESS or None)."""
    tuned = cached.tuned_logprobs.float()
    if gamma == 0:
        head_logits = tuned
    else:
        head_logits = family_logits_full(
            cached.student_logprobs.float(), tuned, cached.base_logprobs.float(), gamma, alpha
        )
    if not tail.uses_draws:
        # The bucket: the exact family tail where the cache knows it, else the fallback rule
        # (targets.family_target_bucket_logits); the cache is at temperature 1, tau divides
        # the composed logits (the bucket as one token).
        exact = exact_family_log_tail(cached, gamma, alpha, facts.alpha, facts.grid)
        shift = tail_shift(cached, alpha, facts.alpha)
        logits = family_target_bucket_logits(cached, gamma, alpha, shift, exact)
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        return logprobs[:, :-1], logprobs[:, -1], None, head_logits, None
    # The draws: stored at the cache's temperature (= tau, checked); the normaliser is exact
    # where the cache knows the tail mass, else estimated with the same draws (self-normalised).
    drawn_logits = drawn_family_logits(cached, gamma, alpha)
    exact = exact_family_log_tail(cached, gamma, alpha, facts.alpha, facts.grid)
    ess = None
    if exact is None:
        weighted = drawn_logits + sample_log_weights(cached)
        exact = torch.logsumexp(weighted, dim=1)
        ess = sampling.effective_sample_size(weighted)
    log_norm = torch.logsumexp(torch.cat([head_logits, exact.unsqueeze(1)], dim=1), dim=1)
    norm = log_norm.unsqueeze(1)
    return head_logits - norm, exact - log_norm, drawn_logits - norm, head_logits, ess


def build_view(
    cached: CachedTargets,
    spec: TargetSpec,
    tail: Tail,
    facts: CacheFacts = CacheFacts(),
    temperature: float = 1.0,
    frozen_student_logits: torch.Tensor | None = None,
) -> TargetView:
    """The view of `spec`'s target on one chunk of cached positions.

    A live frozen S0 (`frozen_student_logits` [N,V]) supplies the base student's fields in place
    of the cache's; a target off the teacher needs one of the two. Draws need the cache's
    temperature; the bucket takes any (the cache is then at temperature 1)."""
    if not temperature > 0:
        raise DeltakdError(f"temperature must be positive, got {temperature}")
    if not tail.uses_draws and facts.temperature != 1.0:
        raise DeltakdError(
            f"cache drawn at temperature {facts.temperature:g} serves only its drawn tails; a "
            "bucket would temper its stored distributions twice"
        )
    if tail.uses_draws:
        if not cached.has_samples:
            raise DeltakdError(
                f"the {tail.name} tail needs a cache with drawn tail ids (cache-teachers "
                "--tail-samples M)"
            )
        if not math.isclose(temperature, facts.temperature, rel_tol=1e-6):
            raise DeltakdError(
                f"cache drawn at temperature {facts.temperature:g}; use {facts.temperature:g} "
                "or rebuild the cache at the temperature you want"
            )
    if spec.needs_student:
        if frozen_student_logits is not None:
            cached = with_live_student(cached, frozen_student_logits, facts.temperature)
        elif cached.student_logprobs is None or cached.student_tail is None:
            raise DeltakdError(
                "this target needs the base student's log-probs: use a cache built with the "
                "student, or give the frozen student"
            )
    parts = [
        (share, _point(cached, gamma, spec.alpha, tail, facts, temperature))
        for share, gamma in spec.points
        if share > 0
    ]
    if len(parts) == 1:
        head, log_tail, drawn, head_logits, ess = parts[0][1]
    else:  # a mixture in probability: log sum_i share_i r_i, column by column
        head, log_tail, drawn = (
            _log_mixture([(share, part[index]) for share, part in parts]) for index in range(3)
        )
        head_logits, ess = None, _smallest([part[4] for _, part in parts])
    return TargetView(
        ids=cached.ids,
        head=head,
        tail=log_tail,
        baseline=tail.baseline,
        drawn_ids=cached.sample_ids.long() if tail.uses_draws else None,
        drawn=drawn,
        drawn_log_weights=sample_log_weights(cached) if tail.uses_draws else None,
        head_logits=head_logits,
        ess=ess,
    )


def _log_mixture(parts: list[tuple[float, torch.Tensor | None]]) -> torch.Tensor | None:
    if parts[0][1] is None:
        return None
    return torch.logsumexp(torch.stack([math.log(s) + t for s, t in parts]), dim=0)


def _smallest(sizes: list[torch.Tensor | None]) -> torch.Tensor | None:
    known = [size for size in sizes if size is not None]
    return torch.stack(known).min(dim=0).values if known else None


def student_view(student_logits: torch.Tensor, view: TargetView, temperature: float = 1.0):
    """The student's side of `view`: one log_softmax over the chunk's logits [N,V] at tau, then
    gathers (and the logsumexp over the complement of K where the view has a bucket)."""
    logprobs = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return StudentView(
        head=logprobs.gather(1, view.ids),
        tail=complement_logsumexp(logprobs, view.ids) if view.baseline > 0 else None,
        drawn=None if view.drawn_ids is None else logprobs.gather(1, view.drawn_ids),
    )


# ---------------------------------------------------------------------------------------------
# A divergence over the view
# ---------------------------------------------------------------------------------------------


def over_columns(terms, view: TargetView, student: StudentView) -> torch.Tensor:
    """sum over the vocabulary of per-token terms f(log r, log p_theta) -> [N, C], estimated on
    the view with its tail estimator (the module's docstring): K, then the bucket carrying
    `baseline` of r's tail mass, then the draws weighted c_j / (M q(j)), each minus f at the
    baseline b_j = baseline m_r p_theta(j) / m_theta (held constant) when there is a bucket."""
    target, own, log_weights = [view.head], [student.head], [torch.zeros_like(view.head)]
    if view.baseline > 0:
        bucket = view.tail + math.log(view.baseline)
        target.append(bucket.unsqueeze(1))
        own.append(student.tail.unsqueeze(1))
        log_weights.append(torch.zeros_like(bucket).unsqueeze(1))
    if view.drawn is not None:
        target.append(view.drawn)
        own.append(student.drawn)
        log_weights.append(view.drawn_log_weights)
    values = terms(torch.cat(target, dim=1), torch.cat(own, dim=1))
    if view.baseline > 0 and view.drawn is not None:
        baseline = (
            math.log(view.baseline) + view.tail.unsqueeze(1) + student.drawn
            - student.tail.unsqueeze(1)
        ).detach()  # fmt: skip
        drawn_count = view.drawn.shape[1]
        correction = values[:, -drawn_count:] - terms(baseline, student.drawn)
        values = torch.cat([values[:, :-drawn_count], correction], dim=1)
    log_weights = torch.cat(log_weights, dim=1).detach()
    weights = log_weights.exp()
    # unused draw slots (count 0) contribute exactly 0, whatever their terms
    return torch.where(weights > 0, values * weights, 0.0).sum(dim=-1)
