"""The tests' way to take one objective's divergence on a chunk: the view (method/view.py) of the
objective's target under a tail estimator, then the registered divergence, exactly as training
does per chunk (train/objective.py's chunk_loss), without the SFT mix. Shortcuts per objective
keep the tests short; the tail defaults to the cache's: its draws when it has them (sampled),
else the bucket."""

from __future__ import annotations

import torch

from deltakd_cli.method.objectives import OBJECTIVES
from deltakd_cli.method.spec import CacheFacts, tail_estimator
from deltakd_cli.method.targets import CachedTargets
from deltakd_cli.method.view import build_view, student_view


def divergence(
    objective: str,
    student_logits: torch.Tensor,
    cached: CachedTargets,
    *,
    tail: str | None = None,
    tail_beta: float = 1.0,
    temperature: float = 1.0,
    cache_alpha: float | None = None,
    cache_grid: tuple = (),
    cache_temperature: float | None = None,
    frozen_student_logits: torch.Tensor | None = None,
    **settings,
) -> torch.Tensor:
    """The objective's divergence per position [N] (settings by keyword: alpha=, gamma=, ...)."""
    entry = OBJECTIVES[objective]
    values = entry.settings(**settings)
    estimator = tail_estimator(tail or ("sampled" if cached.has_samples else "bucket"), tail_beta)
    if cache_temperature is None:
        cache_temperature = temperature if estimator.uses_draws else 1.0
    facts = CacheFacts(cache_alpha, tuple(cache_grid), cache_temperature)
    view = build_view(
        cached, entry.target(values), estimator, facts, temperature, frozen_student_logits
    )
    student = student_view(student_logits, view, temperature)
    return entry.divergence_function()(view, student, values)


def kd_loss(student_logits, cached, temperature=1.0, **kw):
    return divergence("kd", student_logits, cached, temperature=temperature, **kw)


def delta_loss(
    student_logits,
    cached,
    alpha=1.0,
    temperature=1.0,
    cache_alpha=None,
    frozen_student_logits=None,
    **kw,
):
    return divergence(
        "delta",
        student_logits,
        cached,
        alpha=alpha,
        temperature=temperature,
        cache_alpha=cache_alpha,
        frozen_student_logits=frozen_student_logits,
        **kw,
    )


def delta_mse_loss(student_logits, cached, alpha=1.0, frozen_student_logits=None):
    return divergence(
        "delta-mse",
        student_logits,
        cached,
        tail="bucket",
        alpha=alpha,
        frozen_student_logits=frozen_student_logits,
    )


def delta_mix_loss(
    student_logits,
    cached,
    alpha=1.0,
    temperature=1.0,
    cache_alpha=None,
    frozen_student_logits=None,
    mix=0.5,
    **kw,
):
    return divergence(
        "delta-mix",
        student_logits,
        cached,
        alpha=alpha,
        mix=mix,
        temperature=temperature,
        cache_alpha=cache_alpha,
        frozen_student_logits=frozen_student_logits,
        **kw,
    )


def kd_to_delta_loss(
    student_logits,
    cached,
    gamma=1.0,
    alpha=1.0,
    temperature=1.0,
    cache_alpha=None,
    frozen_student_logits=None,
    cache_grid=(),
    **kw,
):
    return divergence(
        "kd-to-delta",
        student_logits,
        cached,
        gamma=gamma,
        alpha=alpha,
        temperature=temperature,
        cache_alpha=cache_alpha,
        frozen_student_logits=frozen_student_logits,
        cache_grid=cache_grid,
        **kw,
    )
