"""The divergences the objectives train with, each over a target view (view.py).

Pure tensor functions, no I/O. A divergence has one signature,

    divergence(view: TargetView, student: StudentView, settings) -> [N]

one value per target position; the trainer sums over positions and divides by the number of
target tokens. Most are sums over the vocabulary of per-token terms f(log r, log p_theta), written
once here as a `*_terms` function and estimated on the view by `view.over_columns`, which alone
knows how the tail outside the kept ids K is estimated (bucket, sampled, corrected). Targets never
receive a gradient; the math runs in float32.

Missing probability mass is always named and kept: terms where the target is zero contribute
exactly 0 (0 * log 0 = 0), so an empty tail (K covers the vocabulary) gives neither NaN values nor
NaN gradients.

    kd          KL(pT || p_theta)
    delta       KL(p* || p_theta), p* = softmax(l0 + alpha * (lT - lB))
    kd-to-delta KL(p_gamma || p_theta), log p_gamma ∝ (1 - gamma) lT + gamma (l0 + alpha Delta)
    delta-mix   KL(mix p* + (1 - mix) pT || p_theta)
    delta-mse   variant: mean over K of (log p_theta - l0 - alpha Delta)^2 (no tail)
    reverse-kl  KL(p_theta || pT)
    gjsd        beta KL(pT || m) + (1 - beta) KL(p_theta || m), m = beta pT + (1 - beta) p_theta
                (TRL's convention: beta 0 and 1 are the two KLs)
    skew-kl     KL(pT || skew pT + (1 - skew) p_theta)
    tv          1/2 sum |pT - p_theta|

Which target each objective's divergence is taken to is its registration's business
(objectives.py); the four forward-KL objectives share `forward_kl`. Every term function here is
positively homogeneous of degree 1 (an f-divergence's), which is what makes the bucket and the
corrected tail of view.py exact in expectation for all of them (docs/method.md).

delta-mse and delta-mix are this tool's own variants, offered for experiments, not as defaults:
only the Delta-KD paper's abstract is known, which does not define them. delta-mse is an
unbounded regression on log-prob shifts rather than a match between distributions."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from deltakd_cli.method.view import StudentView, TargetView, over_columns

# ---------------------------------------------------------------------------------------------
# Per-token terms f(log r, log p) -> [N, C]; the target r never receives a gradient
# ---------------------------------------------------------------------------------------------


def kl_terms(target_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """r (log r - log p) per column, exactly 0 where r is 0 (and then the student's log-prob,
    which may be -inf, is not looked at, by value or by gradient)."""
    target_logprobs = target_logprobs.detach()
    support = target_logprobs > float("-inf")
    zero = torch.zeros((), dtype=student_logprobs.dtype, device=student_logprobs.device)
    safe_target = torch.where(support, target_logprobs, zero)
    log_ratio = safe_target - torch.where(support, student_logprobs, zero)
    return torch.where(support, safe_target.exp() * log_ratio, zero)


def _p_log_ratio(p_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    """p (log p - log other) per column, 0 where p is 0. Unlike `kl_terms`, p keeps its
    gradient: the student's side of reverse KL and of the JSD."""
    support = p_logprobs > float("-inf")
    zero = torch.zeros((), dtype=p_logprobs.dtype, device=p_logprobs.device)
    safe_p = torch.where(support, p_logprobs, zero)
    safe_other = torch.where(support, other_logprobs, zero)
    return torch.where(support, safe_p.exp() * (safe_p - safe_other), zero)


def reverse_kl_terms(target_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """p (log p - log r) per column."""
    return _p_log_ratio(student_logprobs, target_logprobs.detach())


def _log_mixture(
    target_logprobs: torch.Tensor, student_logprobs: torch.Tensor, share: float
) -> torch.Tensor:
    """log(share r + (1 - share) p) per column, for 0 < share < 1."""
    return torch.logaddexp(target_logprobs + math.log(share), student_logprobs + math.log1p(-share))


def jsd_terms(
    target_logprobs: torch.Tensor, student_logprobs: torch.Tensor, beta: float
) -> torch.Tensor:
    """The generalised JSD's terms, TRL's `generalized_jsd_loss` convention: with m = beta r +
    (1 - beta) p, beta r log(r/m) + (1 - beta) p log(p/m); beta 0 is the forward KL, beta 1 the
    reverse KL (the plain KLs, as in TRL, not the mixture's limits, which vanish)."""
    target_logprobs = target_logprobs.detach()
    if beta == 0:
        return kl_terms(target_logprobs, student_logprobs)
    if beta == 1:
        return reverse_kl_terms(target_logprobs, student_logprobs)
    mixture = _log_mixture(target_logprobs, student_logprobs, beta)
    student_side = _p_log_ratio(student_logprobs, mixture)
    return beta * kl_terms(target_logprobs, mixture) + (1 - beta) * student_side


def skew_kl_terms(
    target_logprobs: torch.Tensor, student_logprobs: torch.Tensor, skew: float
) -> torch.Tensor:
    """DistiLLM's skew KL (Ko et al., 2024): r log(r / (skew r + (1 - skew) p)); skew 0 is the
    forward KL. At most log(1 / skew) summed, where skew > 0."""
    target_logprobs = target_logprobs.detach()
    mixture = student_logprobs
    if skew > 0:
        mixture = _log_mixture(target_logprobs, student_logprobs, skew)
    return kl_terms(target_logprobs, mixture)


def tv_terms(target_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """1/2 |r - p| per column."""
    return 0.5 * (target_logprobs.detach().exp() - student_logprobs.exp()).abs()


# ---------------------------------------------------------------------------------------------
# The divergences the objectives register: (view, student, settings) -> [N]
# ---------------------------------------------------------------------------------------------


def forward_kl(view: TargetView, student: StudentView, settings: Any = None) -> torch.Tensor:
    """KL(r || p_theta): kd, delta, kd-to-delta and delta-mix, each to its own target."""
    return over_columns(kl_terms, view, student)


def reverse_kl(view: TargetView, student: StudentView, settings: Any = None) -> torch.Tensor:
    """KL(p_theta || r): mode-seeking (the student need not cover the teacher)."""
    return over_columns(reverse_kl_terms, view, student)


def gjsd(view: TargetView, student: StudentView, settings: Any) -> torch.Tensor:
    return over_columns(lambda r, p: jsd_terms(r, p, settings.beta), view, student)


def skew_kl(view: TargetView, student: StudentView, settings: Any) -> torch.Tensor:
    return over_columns(lambda r, p: skew_kl_terms(r, p, settings.skew), view, student)


def total_variation(view: TargetView, student: StudentView, settings: Any = None) -> torch.Tensor:
    return over_columns(tv_terms, view, student)


def shift_mse(view: TargetView, student: StudentView, settings: Any = None) -> torch.Tensor:
    """delta-mse: mean over K of (log p_theta - (l0 + alpha Delta))^2, the student's own shift
    from S0 against the teachers' shift, at the kept ids only (no tail, no temperature)."""
    return ((student.head - view.head_logits.detach()) ** 2).mean(dim=-1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the reference token per position [N]."""
    return F.cross_entropy(logits.float(), labels, reduction="none")
