"""Per-position training losses: SFT, KD to the tuned teacher, Delta-KD, its variants and family,
and the divergences of the field (reverse KL, generalised JSD, skew KL, total variation).

Pure tensor functions, no I/O. Every loss returns one value per target position ([N]); the trainer
sums over positions and divides by the number of target tokens. Student logits may be float32 or
bfloat16; the math runs in float32. Targets (cache entries, frozen S0 logits) never receive a
gradient.

Missing probability mass is always named and kept, by one of two tail rules:
- the *tail bucket*: a cached target lives on the kept ids K plus one bucket holding the mass
  outside K, and the student is compared on the same K plus its own tail bucket (its log-mass
  outside K, a logsumexp over the complement);
- the *sampled tail* (a cache built with --tail-samples): the target lives on K plus ids drawn
  from a proposal q over the tail, each weighted c_j / (M q(j)), so that t_hat = weight * r is an
  unbiased estimate of the full-vocabulary target r and the loss's gradient with respect to the
  student's logits, sum(t_hat) p_theta - t_hat, is unbiased too (`support_kl`).
Per-position KL uses 0 * log 0 = 0, so an empty tail (k = |V|, tail mass exactly 0) gives neither
NaN values nor NaN gradients.

The objectives (objectives.py registers each: its settings, this module's function, what it
needs, its label), every one a divergence over K + the tail:
    sft        cross-entropy on the reference token
    kd         KL(pT || p_theta)
    delta      KL(p* || p_theta), p* = softmax(l0 + alpha * (lT - lB)), from the cache
    delta-mse  variant: MSE between the student's own shift log p_theta - l0 and alpha*Delta at K
    delta-mix  variant: KL(mix * p* + (1 - mix) * pT || p_theta)
    kd-to-delta  KL(p_gamma || p_theta), log p_gamma ∝ (1 - gamma) lT + gamma (l0 + alpha Delta):
               gamma 0 is kd, gamma 1 is delta (docs/method.md)
    reverse-kl KL(p_theta || pT)
    gjsd       beta KL(pT || m) + (1 - beta) KL(p_theta || m), m = beta pT + (1 - beta) p_theta
               (TRL's convention: beta 0 and 1 are the two KLs)
    skew-kl    KL(pT || skew pT + (1 - skew) p_theta)
    tv         1/2 sum |pT - p_theta|
Over K + one tail bucket each is the divergence of the coarsened distributions, a lower bound of
the full one; over K + the drawn ids, weighted, an unbiased estimate of it.

Adding an objective: one function with the signature (student logits, cached targets, its
settings, LossContext) -> [N] here, and one registry entry in objectives.py.

The two variants are this tool's own choices, offered for experiments, not as defaults: only the
Delta-KD paper's abstract is known, which does not define them. delta-mse in particular is an
unbounded regression on log-prob shifts rather than a match between distributions (see
docs/method.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from deltakd_cli import objectives
from deltakd_cli.errors import DeltakdError
from deltakd_cli.objectives import Objective
from deltakd_cli.targets import (
    CachedTargets,
    bucket_logprobs,
    complement_logsumexp,
    delta_target_bucket_logits,
    delta_target_logits_full,
    drawn_family_logits,
    exact_family_log_tail,
    family_logits_full,
    family_target_bucket_logits,
    grid_column,
    kd_target_bucket_logits,
    sample_log_weights,
    sampled_target_logprobs,
    scaled_delta,
    support_ids,
    tail_mass,
    tail_shift,
)


@dataclass(frozen=True)
class LossContext:
    """What a loss knows besides the tensors and its objective's settings (objectives.py)."""

    temperature: float = 1.0
    cache_alpha: float | None = None  # the alpha the cache's mass-matched tail was made for
    cache_grid: tuple[tuple[float, float], ...] = ()  # the cache's (gamma, alpha) points
    cache_temperature: float = 1.0  # the temperature the cache's distributions are stored at
    frozen_student_logits: torch.Tensor | None = None  # a live frozen S0's logits [N,V]


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def kl_divergence(
    target_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(target || student) per row [N] from log-probs over the same support [N,S]:
    sum_s w_s r_s (log r_s - log p_s), with inclusion weights w (given in log space; None: all 1,
    the exact KL over a partition such as K + tail bucket). With the sampled tail's weights this
    is the unbiased estimate of the full-vocabulary KL; it may be negative at one position.

    Terms where the weighted target is zero contribute exactly 0 (0 * log 0 = 0), and neither
    the value nor the gradient sees the student's log-prob there (it may be -inf). The target and
    the weights are detached."""
    target_logprobs = target_logprobs.detach()
    weighted = target_logprobs if log_weights is None else target_logprobs + log_weights.detach()
    target_probs = weighted.exp()
    support = target_probs > 0
    zero = torch.zeros((), dtype=student_logprobs.dtype, device=student_logprobs.device)
    log_ratio = torch.where(support, target_logprobs, zero) - torch.where(
        support, student_logprobs, zero
    )
    return (target_probs * log_ratio).sum(dim=-1)


def student_bucketed_logprobs(
    student_logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """The student's log-probs (at temperature tau) at K plus its tail bucket [N,k+1]: the last
    column is its log-mass outside K, a logsumexp over the complement (exact at any tau, since
    the student's full logits are known)."""
    logprobs = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    tail = complement_logsumexp(logprobs, ids)
    return torch.cat([logprobs.gather(1, ids), tail.unsqueeze(1)], dim=1)


def student_support_logprobs(
    student_logits: torch.Tensor, cached: CachedTargets, temperature: float = 1.0
) -> torch.Tensor:
    """The student's log-probs (at temperature tau) on a sampled target's columns, K then the
    drawn ids [N,k+M]: one log_softmax over the chunk's logits, then a gather."""
    logprobs = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return logprobs.gather(1, support_ids(cached))


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


def sampled_family_target(
    cached: CachedTargets,
    gamma: float,
    alpha: float,
    cache_alpha: float | None,
    cache_grid: tuple[tuple[float, float], ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The sampled target of p_gamma,alpha (gamma 0: pT, gamma 1: p*) on K + the drawn ids:
    (log r [N,k+M], log inclusion weights [N,k+M], the effective sample size [N] of
    self-normalised weights; None where the normaliser is exact, `exact_family_log_tail`)."""
    tuned = cached.tuned_logprobs.float()
    if gamma == 0:
        head = tuned
    else:
        if cached.student_logprobs is None:
            raise DeltakdError(
                "this target needs the base student's log-probs: use a cache built with the "
                "student, or give the frozen student"
            )
        head = family_logits_full(
            cached.student_logprobs.float(), tuned, cached.base_logprobs.float(), gamma, alpha
        )
    drawn_weights = sample_log_weights(cached)
    exact_tail = exact_family_log_tail(cached, gamma, alpha, cache_alpha, cache_grid)
    target, ess = sampled_target_logprobs(
        head, drawn_family_logits(cached, gamma, alpha), drawn_weights, exact_tail
    )
    weights = torch.cat([torch.zeros_like(head), drawn_weights], dim=1)
    return target, weights, ess


def _sampled_family_kl(
    student_logits: torch.Tensor,
    cached: CachedTargets,
    gamma: float,
    alpha: float,
    context: LossContext,
) -> torch.Tensor:
    """KL(p_gamma,alpha || p_theta) per position [N] with the sampled tail (kd, delta and
    kd-to-delta): the target as stored (at the cache's temperature), the student at tau."""
    frozen = context.frozen_student_logits
    if frozen is not None and gamma > 0:
        cached = with_live_student(cached, frozen, context.cache_temperature)
    target, weights, _ = sampled_family_target(
        cached, gamma, alpha, context.cache_alpha, context.cache_grid
    )
    student = student_support_logprobs(student_logits, cached, context.temperature)
    return kl_divergence(target, student, weights)


def teacher_pair(
    student_logits: torch.Tensor, cached: CachedTargets, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The tuned teacher pT and the student p_theta on the same columns, as log-probs, with the
    columns' log inclusion weights: (target, student, log weights).

    Tail bucket: K plus one bucket each [N,k+1], weights None (a partition: every divergence
    over it is exact for the coarsened distributions, and a lower bound of the full one, by the
    data-processing inequality). Sampled tail: K plus the drawn ids [N,k+M] with weights
    c_j / (M q(j)), so that a sum over the columns of any per-token term, weighted, is an
    unbiased estimate of its sum over the vocabulary."""
    if cached.has_samples:
        target, weights, _ = sampled_family_target(cached, 0.0, 1.0, None)
        return target, student_support_logprobs(student_logits, cached, temperature), weights
    target = torch.log_softmax(kd_target_bucket_logits(cached) / temperature, dim=-1)
    return target, student_bucketed_logprobs(student_logits, cached.ids, temperature), None


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise DeltakdError(f"temperature must be positive, got {temperature}")


def _check_shapes(
    student_logits: torch.Tensor,
    cached: CachedTargets,
    frozen_student_logits: torch.Tensor | None = None,
) -> None:
    if student_logits.dim() != 2:
        raise DeltakdError(
            f"student logits must be [positions, vocab], got {tuple(student_logits.shape)}"
        )
    if cached.ids.dim() != 2 or cached.ids.shape[0] != student_logits.shape[0]:
        raise DeltakdError(
            f"cached ids {tuple(cached.ids.shape)} do not match student logits "
            f"{tuple(student_logits.shape)} (one row per target position)"
        )
    if cached.ids.shape[1] > student_logits.shape[1]:
        raise DeltakdError(
            f"the cache keeps {cached.ids.shape[1]} ids per position but the student's "
            f"vocabulary has only {student_logits.shape[1]}"
        )
    if frozen_student_logits is not None and frozen_student_logits.shape != student_logits.shape:
        raise DeltakdError(
            f"frozen student logits {tuple(frozen_student_logits.shape)} do not match the "
            f"student's {tuple(student_logits.shape)}"
        )


def _use_cached_student(
    cached: CachedTargets, frozen_student_logits: torch.Tensor | None, objective: str
) -> bool:
    """Bucketed path (cached S0) unless frozen S0 logits are given; one of the two must exist."""
    if frozen_student_logits is not None:
        return False
    if not cached.has_student or cached.student_tail is None:
        raise DeltakdError(
            f"objective {objective!r} needs the base student's log-probs: use a cache built with "
            "the student, or give the frozen student"
        )
    return True


def _delta_target_bucketed_or_full(
    cached: CachedTargets,
    alpha: float,
    temperature: float,
    cache_alpha: float | None,
    frozen_student_logits: torch.Tensor | None,
    objective: str,
) -> tuple[torch.Tensor, bool]:
    """log p* at temperature tau, and whether it is bucketed ([N,k+1]) or full ([N,V])."""
    shift = tail_shift(cached, alpha, cache_alpha)
    if _use_cached_student(cached, frozen_student_logits, objective):
        logits = delta_target_bucket_logits(cached, alpha, shift)
        return torch.log_softmax(logits / temperature, dim=-1), True
    frozen_logprobs = torch.log_softmax(frozen_student_logits.detach().float(), dim=-1)
    logits = delta_target_logits_full(frozen_logprobs, cached, alpha, shift)
    return torch.log_softmax(logits / temperature, dim=-1), False


# ---------------------------------------------------------------------------------------------
# The objectives
# ---------------------------------------------------------------------------------------------


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the reference token per position [N]."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def kd_loss(
    student_logits: torch.Tensor, cached: CachedTargets, temperature: float = 1.0
) -> torch.Tensor:
    """Forward KL(pT || p_theta) per position [N] over K plus one tail bucket.

    Target: log pT at K and log(tuned_tail) as the bucket, both divided by tau and renormalised.
    Student: log_softmax(z / tau) at K and its log-mass outside K. At tau = 1 this is exactly the
    KL between the two distributions coarsened to K + tail. At tau != 1 the target tail bucket is
    an approximation: the tempered tail mass would be sum_tail pT(y)^(1/tau) (up to the
    normaliser), which the cache cannot know, and log(mT) / tau treats the whole tail as a single
    token of mass mT."""
    _check_temperature(temperature)
    _check_shapes(student_logits, cached)
    return kl_divergence(*teacher_pair(student_logits, cached, temperature))


def delta_loss(
    student_logits: torch.Tensor,
    cached: CachedTargets,
    alpha: float = 1.0,
    temperature: float = 1.0,
    cache_alpha: float | None = None,
    frozen_student_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p* || p_theta) per position [N], p* = softmax(l0 + alpha*Delta) with the tail rule of
    `targets.tail_shift` (the stored mass-matched shift at the cache's alpha, else the teachers').

    Bucketed path (cache holds S0, no frozen logits given): target over K + tail bucket from the
    cached student; the student is compared on K + its own tail bucket. Full path (frozen S0
    logits given): target over the whole vocabulary, l0 + shift outside K. The two are equal in
    value and gradient at theta = S0 (tau = 1). Temperature divides the composed target logits
    and the student logits; in the bucketed path the tail bucket logit is divided as one token
    (exact at tau = 1)."""
    _check_temperature(temperature)
    _check_shapes(student_logits, cached, frozen_student_logits)
    if cached.has_samples:
        if frozen_student_logits is None:
            _use_cached_student(cached, None, "delta")
        context = LossContext(
            temperature=temperature,
            cache_alpha=cache_alpha,
            cache_temperature=temperature,
            frozen_student_logits=frozen_student_logits,
        )
        return _sampled_family_kl(student_logits, cached, 1.0, alpha, context)
    target, bucketed = _delta_target_bucketed_or_full(
        cached, alpha, temperature, cache_alpha, frozen_student_logits, "delta"
    )
    if bucketed:
        student = student_bucketed_logprobs(student_logits, cached.ids, temperature)
    else:
        student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return kl_divergence(target, student)


def delta_mse_loss(
    student_logits: torch.Tensor,
    cached: CachedTargets,
    alpha: float = 1.0,
    frozen_student_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Variant "delta-mse": mean over K of (log p_theta - l0 - alpha*Delta)^2 per position [N].

    Matches the student's own shift from S0 to the teachers' shift at the cached ids only (no
    tail, no temperature). l0 comes from the cache when it holds S0 and no frozen logits are
    given, else from the frozen logits. Unbounded and blind to the tail: the least stable of the
    objectives here."""
    _check_shapes(student_logits, cached, frozen_student_logits)
    ids = cached.ids
    if _use_cached_student(cached, frozen_student_logits, "delta-mse"):
        base_student_at_kept = cached.student_logprobs.float()
    else:
        frozen_logprobs = torch.log_softmax(frozen_student_logits.detach().float(), dim=-1)
        base_student_at_kept = frozen_logprobs.gather(1, ids)
    target_shift = scaled_delta(
        cached.tuned_logprobs.float(), cached.base_logprobs.float(), alpha
    ).detach()
    student_at_kept = torch.log_softmax(student_logits.float(), dim=-1).gather(1, ids)
    own_shift = student_at_kept - base_student_at_kept.detach()
    return ((own_shift - target_shift) ** 2).mean(dim=-1)


def delta_mix_loss(
    student_logits: torch.Tensor,
    cached: CachedTargets,
    alpha: float = 1.0,
    temperature: float = 1.0,
    cache_alpha: float | None = None,
    frozen_student_logits: torch.Tensor | None = None,
    mix: float = 0.5,
) -> torch.Tensor:
    """Variant "delta-mix": KL(mix * p* + (1 - mix) * pT || p_theta) per position [N] over K plus
    the tail bucket (pT is known only there). p* comes from the same path as `delta_loss` (a full
    target is coarsened to K + tail). mix = 1 gives the bucketed delta loss, mix = 0 the kd loss."""
    _check_temperature(temperature)
    _check_shapes(student_logits, cached, frozen_student_logits)
    if not 0.0 <= mix <= 1.0:
        raise DeltakdError(f"mix must be between 0 and 1, got {mix}")
    log_mix = math.log(mix) if mix > 0 else float("-inf")
    log_rest = math.log1p(-mix) if mix < 1 else float("-inf")
    if cached.has_samples:
        if frozen_student_logits is None:
            _use_cached_student(cached, None, "delta-mix")
        else:
            cached = with_live_student(cached, frozen_student_logits, temperature)
        delta_target, weights, _ = sampled_family_target(cached, 1.0, alpha, cache_alpha)
        kd_target, _, _ = sampled_family_target(cached, 0.0, alpha, cache_alpha)
        target = torch.logaddexp(delta_target + log_mix, kd_target + log_rest)
        student = student_support_logprobs(student_logits, cached, temperature)
        return kl_divergence(target, student, weights)
    delta_target, bucketed = _delta_target_bucketed_or_full(
        cached, alpha, temperature, cache_alpha, frozen_student_logits, "delta-mix"
    )
    if not bucketed:
        delta_target = bucket_logprobs(delta_target, cached.ids)
    kd_target = torch.log_softmax(kd_target_bucket_logits(cached) / temperature, dim=-1)
    target = torch.logaddexp(delta_target + log_mix, kd_target + log_rest)
    student = student_bucketed_logprobs(student_logits, cached.ids, temperature)
    return kl_divergence(target, student)


def kd_to_delta_loss(
    student_logits: torch.Tensor,
    cached: CachedTargets,
    gamma: float = 1.0,
    alpha: float = 1.0,
    temperature: float = 1.0,
    cache_alpha: float | None = None,
    frozen_student_logits: torch.Tensor | None = None,
    cache_grid: tuple[tuple[float, float], ...] = (),
) -> torch.Tensor:
    """Objective "kd-to-delta": KL(p_gamma,alpha || p_theta) per position [N] over K + tail bucket,

        log p_gamma,alpha ∝ (1 - gamma) * lT + gamma * (l0 + alpha * Delta),

    the geometric path from the tuned teacher (gamma 0: exactly `kd_loss`) to the Delta target
    (gamma 1: exactly the bucketed `delta_loss` with the same tail rule). l0 at K and S0's tail
    mass come from the cache or, given frozen S0 logits, from them; either way the loss stays
    bucketed. The tail bucket is the cache's exact family tail when (gamma, alpha) is one of
    `cache_grid`'s points and the batch holds it, else the fallback of
    `targets.family_target_bucket_logits` (an upper bound, exact at gamma 0 and 1).
    Temperature as in kd and delta: the bucket logits are divided by tau as one token each."""
    _check_temperature(temperature)
    _check_shapes(student_logits, cached, frozen_student_logits)
    if not 0.0 <= gamma <= 1.0:
        raise DeltakdError(f"gamma must be between 0 and 1, got {gamma}")
    if not _use_cached_student(cached, frozen_student_logits, "kd-to-delta"):
        # The live S0 supplies what the cache would: l0 at K (and the drawn ids), its tail mass,
        # at the cache's temperature (a sampled cache's; a bucket cache's target is tempered later).
        live_temperature = temperature if cached.has_samples else 1.0
        cached = with_live_student(cached, frozen_student_logits, live_temperature)
    if cached.has_samples:
        context = LossContext(
            temperature=temperature, cache_alpha=cache_alpha, cache_grid=cache_grid
        )
        return _sampled_family_kl(student_logits, cached, gamma, alpha, context)
    shift = tail_shift(cached, alpha, cache_alpha)
    exact_log_tail = None
    column = grid_column(cache_grid, gamma, alpha)
    if cached.family_tail_logmass is not None and column is not None:
        exact_log_tail = cached.family_tail_logmass[:, column]
    logits = family_target_bucket_logits(cached, gamma, alpha, shift, exact_log_tail)
    target = torch.log_softmax(logits / temperature, dim=-1)
    student = student_bucketed_logprobs(student_logits, cached.ids, temperature)
    return kl_divergence(target, student)


# ---------------------------------------------------------------------------------------------
# Divergences over the columns of `teacher_pair` (K + tail bucket, or K + drawn ids, weighted)
# ---------------------------------------------------------------------------------------------


def _weighted_sum(terms: torch.Tensor, log_weights: torch.Tensor | None) -> torch.Tensor:
    """sum_s w_s terms_s per row [N] (w = 1 without weights)."""
    if log_weights is None:
        return terms.sum(dim=-1)
    return (terms * log_weights.detach().exp()).sum(dim=-1)


def _p_log_ratio(p_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    """p (log p - log other) per column, 0 where p is 0 (0 log 0 = 0, and no NaN gradient
    reaches a -inf on either side). Unlike `kl_divergence`, p keeps its gradient: the student's
    side of reverse KL and of the JSD."""
    support = p_logprobs > float("-inf")
    zero = torch.zeros((), dtype=p_logprobs.dtype, device=p_logprobs.device)
    safe_p = torch.where(support, p_logprobs, zero)
    safe_other = torch.where(support, other_logprobs, zero)
    return torch.where(support, safe_p.exp() * (safe_p - safe_other), zero)


def reverse_kl_divergence(
    target_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(student || target) per row [N]: sum_s w_s p_s (log p_s - log r_s)."""
    return _weighted_sum(_p_log_ratio(student_logprobs, target_logprobs.detach()), log_weights)


def _log_mixture(
    target_logprobs: torch.Tensor, student_logprobs: torch.Tensor, share: float
) -> torch.Tensor:
    """log(share r + (1 - share) p) per column, for 0 < share < 1."""
    return torch.logaddexp(target_logprobs + math.log(share), student_logprobs + math.log1p(-share))


def generalized_jsd(
    target_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    beta: float,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The generalised Jensen-Shannon divergence per row [N], in TRL's `generalized_jsd_loss`
    convention: with m = beta r + (1 - beta) p, beta KL(r || m) + (1 - beta) KL(p || m); beta 0
    is the forward KL(r || p), beta 1 the reverse KL(p || r) (the two ends are the plain KLs, as
    in TRL, not the mixture's limits, which vanish)."""
    target_logprobs = target_logprobs.detach()
    if beta == 0:
        return kl_divergence(target_logprobs, student_logprobs, log_weights)
    if beta == 1:
        return reverse_kl_divergence(target_logprobs, student_logprobs, log_weights)
    mixture = _log_mixture(target_logprobs, student_logprobs, beta)
    student_side = _weighted_sum(_p_log_ratio(student_logprobs, mixture), log_weights)
    return beta * kl_divergence(target_logprobs, mixture, log_weights) + (1 - beta) * student_side


def skew_kl_divergence(
    target_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    skew: float,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The skew KL of DistiLLM (Ko et al., 2024) per row [N]: KL(r || skew r + (1 - skew) p);
    skew 0 is the forward KL. At most log(1 / skew) where skew > 0."""
    target_logprobs = target_logprobs.detach()
    mixture = student_logprobs
    if skew > 0:
        mixture = _log_mixture(target_logprobs, student_logprobs, skew)
    return kl_divergence(target_logprobs, mixture, log_weights)


def total_variation_distance(
    target_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Total variation per row [N]: 1/2 sum_s w_s |r_s - p_s|."""
    terms = (target_logprobs.detach().exp() - student_logprobs.exp()).abs()
    return 0.5 * _weighted_sum(terms, log_weights)


# ---------------------------------------------------------------------------------------------
# The registered objectives (objectives.py names each): one signature,
# (student logits [N,V], cached targets, the objective's settings, LossContext) -> [N]
# ---------------------------------------------------------------------------------------------


def kd_objective(student_logits, cached, settings, context: LossContext) -> torch.Tensor:
    return kd_loss(student_logits, cached, context.temperature)


def _delta_arguments(settings, context: LossContext) -> tuple:
    """What delta_loss and delta_mix_loss take after the tensors: alpha, temperature, the cache's
    alpha, the frozen S0's logits."""
    return settings.alpha, context.temperature, context.cache_alpha, context.frozen_student_logits


def delta_objective(student_logits, cached, settings, context: LossContext) -> torch.Tensor:
    return delta_loss(student_logits, cached, *_delta_arguments(settings, context))


def delta_mse_objective(student_logits, cached, settings, context: LossContext) -> torch.Tensor:
    return delta_mse_loss(student_logits, cached, settings.alpha, context.frozen_student_logits)


def delta_mix_objective(student_logits, cached, settings, context: LossContext) -> torch.Tensor:
    arguments = _delta_arguments(settings, context)
    return delta_mix_loss(student_logits, cached, *arguments, settings.mix)


def kd_to_delta_objective(student_logits, cached, settings, context: LossContext) -> torch.Tensor:
    return kd_to_delta_loss(
        student_logits,
        cached,
        settings.gamma,
        settings.alpha,
        context.temperature,
        context.cache_alpha,
        context.frozen_student_logits,
        context.cache_grid,
    )


def _to_the_teacher(divergence, student_logits, cached, context: LossContext, *setting):
    """`divergence`(pT, p_theta, *setting) over `teacher_pair`'s columns and weights."""
    _check_shapes(student_logits, cached)
    target, student, weights = teacher_pair(student_logits, cached, context.temperature)
    return divergence(target, student, *setting, log_weights=weights)


def reverse_kl_objective(student_logits, cached, settings, context: LossContext) -> torch.Tensor:
    """KL(p_theta || pT) over K + tail: mode-seeking (the student need not cover the teacher)."""
    return _to_the_teacher(reverse_kl_divergence, student_logits, cached, context)


def gjsd_objective(student_logits, cached, settings, context: LossContext) -> torch.Tensor:
    return _to_the_teacher(generalized_jsd, student_logits, cached, context, settings.beta)


def skew_kl_objective(student_logits, cached, settings, context: LossContext) -> torch.Tensor:
    return _to_the_teacher(skew_kl_divergence, student_logits, cached, context, settings.skew)


def tv_objective(student_logits, cached, settings, context: LossContext) -> torch.Tensor:
    return _to_the_teacher(total_variation_distance, student_logits, cached, context)


# ---------------------------------------------------------------------------------------------
# One chunk's training loss
# ---------------------------------------------------------------------------------------------


def objective_loss(
    objective: str | Objective,
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    cached: CachedTargets | None,
    *,
    settings: Any = None,
    temperature: float = 1.0,
    sft_weight: float = 0.0,
    cache_alpha: float | None = None,
    frozen_student_logits: torch.Tensor | None = None,
    cache_grid: tuple[tuple[float, float], ...] = (),
    cache_temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The training loss of one chunk of positions, as per-position tensors [N]:

    "sft" (cross-entropy), "distill" (the objective's divergence, zeros for "sft") and "loss" =
    sft_weight * sft + (1 - sft_weight) * distill * temperature**2 (the tau^2 keeps gradient
    scales comparable across temperatures); for objective "sft", loss = sft. `settings`: the
    objective's own (objectives.py; None: their defaults)."""
    entry = objective if isinstance(objective, Objective) else objectives.get(objective)
    _check_temperature(temperature)
    if not 0.0 <= sft_weight <= 1.0:
        raise DeltakdError(f"sft weight must be between 0 and 1, got {sft_weight}")
    logits = student_logits.float()
    sft = sft_loss(logits, labels)
    divergence = entry.loss_function()
    if divergence is None:
        return {"loss": sft, "sft": sft, "distill": torch.zeros_like(sft)}
    if cached is None:
        raise DeltakdError(f"objective {entry.name!r} needs cached teacher targets")
    if not entry.takes_temperature and temperature != 1.0:
        raise DeltakdError(
            f"objective {entry.name!r} matches log-prob shifts and takes no temperature; "
            "use temperature 1"
        )
    if cached.has_samples and not math.isclose(temperature, cache_temperature, rel_tol=1e-6):
        raise DeltakdError(
            f"cache drawn at temperature {cache_temperature:g}; use {cache_temperature:g} or "
            "rebuild the cache at the temperature you want"
        )
    context = LossContext(
        temperature, cache_alpha, tuple(cache_grid), cache_temperature, frozen_student_logits
    )
    distill = divergence(logits, cached, settings or entry.settings(), context)
    loss = sft_weight * sft + (1.0 - sft_weight) * distill * temperature**2
    return {"loss": loss, "sft": sft, "distill": distill}
