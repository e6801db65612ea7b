"""How close a cached target is to the full-vocabulary one: total variation, and the cosine
between the cached loss's gradient and the dense loss's, per position. Dense references over the
whole vocabulary, for the tests and the benches (bench/target_fidelity.py,
bench/sampled_fidelity.py); training never calls them."""

from __future__ import annotations

import math

import torch

from deltakd_cli.method.divergences import forward_kl  # the loss's own code, not a copy
from deltakd_cli.method.spec import CacheFacts, Tail, TargetSpec
from deltakd_cli.method.targets import (
    CachedTargets,
    GridPoint,
    build_cached_targets,
    delta_target_full,
    exact_delta_target,
    exact_family_target,
    family_target_bucket_logits,
    tail_mass,
    tail_shift,
)
from deltakd_cli.method.view import build_view, student_view


def total_variation(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """0.5 * sum |p - q| per row [N]."""
    return 0.5 * (p_logprobs.exp() - q_logprobs.exp()).abs().sum(dim=-1)


def _cosine(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine; 1 where both rows are zero (they agree), 0 where only one is."""
    dot = (first * second).sum(dim=-1)
    norms = first.norm(dim=-1) * second.norm(dim=-1)
    both_zero = (first.norm(dim=-1) == 0) & (second.norm(dim=-1) == 0)
    cosine = torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0)
    return torch.where(both_zero, torch.ones_like(cosine), cosine)


def delta_grad_cosine(
    student_logprobs: torch.Tensor,
    tuned_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    cached: CachedTargets,
    alpha: float,
    shift: torch.Tensor,
) -> torch.Tensor:
    """Per position [N]: the cosine between the exact gradient of KL(p*||p_theta) with respect to
    the student logits at theta = S0, p0 - p*, and the cached one, p0 - p*_cached, where
    p*_cached = delta_target_full(student_logprobs, cached, alpha, shift)."""
    p0 = student_logprobs.exp()
    exact = exact_delta_target(student_logprobs, tuned_logprobs, base_logprobs, alpha).exp()
    cached_target = delta_target_full(student_logprobs, cached, alpha, shift).exp()
    return _cosine(p0 - exact, p0 - cached_target)


def target_fidelity(
    student_logprobs: torch.Tensor,
    tuned_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    k: int,
    rule: str,
    tail_rule: str,
    alpha: float = 1.0,
) -> dict[str, torch.Tensor]:
    """How well a cache of k ids (rule, tail_rule) reproduces the exact Delta target at S0.

    Returns per-position tensors [N]: "cosine" (exact vs cached gradient of KL(p*||p_theta)
    with respect to the student logits at theta = S0) and "tv" (total variation between the
    exact and the cached target over the full vocabulary). The cache is used at its own alpha."""
    cached = build_cached_targets(
        tuned_logprobs, base_logprobs, student_logprobs, k, rule, alpha, tail_rule
    )
    shift = tail_shift(cached, alpha, alpha)
    exact = exact_delta_target(student_logprobs, tuned_logprobs, base_logprobs, alpha)
    approx = delta_target_full(student_logprobs, cached, alpha, shift).to(exact.dtype)
    cosine = delta_grad_cosine(
        student_logprobs, tuned_logprobs, base_logprobs, cached, alpha, shift
    )
    return {"cosine": cosine, "tv": total_variation(exact, approx)}


def family_grad_cosine(
    student_logprobs: torch.Tensor,
    tuned_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    cached: CachedTargets,
    gamma: float,
    alpha: float,
    shift: torch.Tensor,
    exact_log_tail: torch.Tensor | None,
) -> torch.Tensor:
    """Per position [N]: the cosine between the exact gradient of KL(p_gamma,alpha || p_theta)
    with respect to the student logits at theta = S0, p0 - p_gamma,alpha, and the gradient of the
    cached bucketed loss there, p0 - q, where q holds the bucket target on K and spreads its tail
    bucket over the tail as S0 does (the bucketed loss's gradient on a tail logit z_y is
    p0(y) - q_tail * p0(y) / m0). `cached` must hold S0's log-probs and tail mass."""
    p0 = student_logprobs.exp()
    exact = exact_family_target(student_logprobs, tuned_logprobs, base_logprobs, gamma, alpha).exp()
    bucket = torch.softmax(
        family_target_bucket_logits(cached, gamma, alpha, shift, exact_log_tail), dim=-1
    ).to(p0.dtype)
    ids = cached.ids
    student_tail = tail_mass(student_logprobs, ids).to(p0.dtype)
    spread = torch.where(
        student_tail > 0, bucket[:, -1] / student_tail.clamp_min(torch.finfo(p0.dtype).tiny), 0
    )
    cached_target = (p0 * spread.unsqueeze(1)).scatter(1, ids, bucket[:, :-1])
    return _cosine(p0 - exact, p0 - cached_target)


def family_fidelity(
    student_logprobs: torch.Tensor,
    tuned_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    k: int,
    grid: tuple[GridPoint, ...],
    alpha: float = 1.0,
) -> dict[GridPoint, dict[str, torch.Tensor]]:
    """How well a grid cache of k ids (selection "grid", mass-matched tail at `alpha`) serves
    each of its grid points: per grid point, per-position tensors [N] "cosine" with the stored
    exact tail and "cosine_fallback" with the fallback tail rule (`family_grad_cosine`)."""
    cached = build_cached_targets(
        tuned_logprobs, base_logprobs, student_logprobs, k, "grid", alpha, "mass-matched", grid
    )
    figures = {}
    for column, (gamma, point_alpha) in enumerate(grid):
        shift = tail_shift(cached, point_alpha, alpha)
        common = (
            student_logprobs,
            tuned_logprobs,
            base_logprobs,
            cached,
            gamma,
            point_alpha,
            shift,
        )
        figures[(gamma, point_alpha)] = {
            "cosine": family_grad_cosine(*common, cached.family_tail_logmass[:, column]),
            "cosine_fallback": family_grad_cosine(*common, None),
        }
    return figures


def view_grad_cosine(
    student_logprobs: torch.Tensor,
    tuned_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    cached: CachedTargets,
    spec: TargetSpec,
    tail: Tail,
    facts: CacheFacts,
) -> torch.Tensor:
    """Per position [N]: at theta = S0, the cosine between the dense gradient of KL(r || p_theta)
    with respect to the student's logits, p0 - r (r: `spec`'s target over the whole vocabulary),
    and the gradient of the cached loss on `tail`'s view of ONE cache (autograd through the view,
    as training takes it): what a single cache gives, noise included."""
    exact = torch.stack(
        [
            math.log(share)
            + exact_family_target(
                student_logprobs, tuned_logprobs, base_logprobs, gamma, spec.alpha
            ).double()
            for share, gamma in spec.points
            if share > 0
        ]
    ).logsumexp(dim=0)
    dense = student_logprobs.double().exp() - exact.exp()
    logits = student_logprobs.float().clone().requires_grad_(True)
    view = build_view(cached, spec, tail, facts, facts.temperature)
    forward_kl(view, student_view(logits, view, facts.temperature)).sum().backward()
    return _cosine(dense, logits.grad.double())
