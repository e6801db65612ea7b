"""Pure tensor functions for the distillation targets: choosing the kept ids, tail masses, the
KD and Delta targets built from cached entries, and the dense full-vocabulary references.

No I/O here. Shapes: N target positions, V vocabulary, k kept ids per position."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from deltakd_cli.errors import DeltakdError
from deltakd_cli.method import sampling
from deltakd_cli.method.rules import (  # noqa: F401  (their home; used here and re-read)
    RULES_NEEDING_GRID,
    RULES_NEEDING_STUDENT,
    SELECTION_RULES,
    TAIL_RULES,
    TAIL_RULES_NEEDING_STUDENT,
    GridPoint,
    default_rules,
)


def _entry(kind: str, source: str, optional: bool = False) -> Any:
    """A per-position field: `kind` is its shape and storage (ids: [N,k] token ids; logprobs:
    [N,k] log-probs at the kept ids; scalar: [N]; grid: [N,G], one value per grid point of the
    KD-to-Delta family, stored at the log-prob precision; sample_ids, counts, sample_logprobs:
    [N,M], the sampled tail's slots); `source` is what it is computed from (the teachers, the
    base student S0, the exact target, which needs S0 too, or the tail proposal, which does)."""
    metadata = {"kind": kind, "source": source}
    if optional:
        return field(default=None, metadata=metadata)
    return field(metadata=metadata)


@dataclass
class CachedTargets:
    """What the cache holds for N target positions: the one per-position schema that the cache
    writer and reader, the batches and `inspect` all iterate over (`PER_POSITION_FIELDS`).
    Torch tensors here (float32 unless noted); numpy arrays of the same shapes in the store.

    ids:              [N, k] int64, the kept token ids K
    tuned_logprobs:   [N, k] log pT at K (normalised over the full vocabulary)
    base_logprobs:    [N, k] log pB at K
    tuned_tail:       [N]    pT mass outside K  (1 - sum_K pT, computed over the complement)
    base_tail:        [N]    pB mass outside K
    target_tail_shift:[N]    mass-matched tail shift c at the cache's alpha, or None
    student_logprobs: [N, k] log p0 (base student) at K, or None (teacher-only cache)
    student_tail:     [N]    p0 mass outside K, or None
    family_tail_logmass: [N, G] the exact log tail mass of the KD-to-Delta family at each grid
                      point (gamma, alpha) of the cache (`family_tail_logmass`), or None

    The sampled tail (a cache built with --tail-samples M; all None otherwise), M slots:
    sample_ids:       [N, M] int64, the distinct ids drawn from the tail proposal q (outside K),
                      ascending; unused slots repeat the last id
    sample_counts:    [N, M] how often each was drawn (they sum to M; 0 in unused slots)
    sample_tuned_logprobs, sample_base_logprobs, sample_student_logprobs: [N, M] log pT, log pB
                      and log p0 at the drawn ids (the student's only with the base student)
    sample_proposal_logprobs: [N, M] log q at the drawn ids; stored when q involves the base
                      student (proposal tuned+target); for the tuned proposal q = pT / m_T, which
                      the stored log pT and m_T give exactly
    """

    ids: torch.Tensor = _entry("ids", "teachers")
    tuned_logprobs: torch.Tensor = _entry("logprobs", "teachers")
    base_logprobs: torch.Tensor = _entry("logprobs", "teachers")
    tuned_tail: torch.Tensor = _entry("scalar", "teachers")
    base_tail: torch.Tensor = _entry("scalar", "teachers")
    target_tail_shift: torch.Tensor | None = _entry("scalar", "target", optional=True)
    student_logprobs: torch.Tensor | None = _entry("logprobs", "student", optional=True)
    student_tail: torch.Tensor | None = _entry("scalar", "student", optional=True)
    family_tail_logmass: torch.Tensor | None = _entry("grid", "target", optional=True)
    sample_ids: torch.Tensor | None = _entry("sample_ids", "teachers", optional=True)
    sample_counts: torch.Tensor | None = _entry("counts", "teachers", optional=True)
    sample_tuned_logprobs: torch.Tensor | None = _entry("sample_logprobs", "teachers", True)
    sample_base_logprobs: torch.Tensor | None = _entry("sample_logprobs", "teachers", True)
    sample_student_logprobs: torch.Tensor | None = _entry("sample_logprobs", "student", True)
    sample_proposal_logprobs: torch.Tensor | None = _entry("sample_logprobs", "proposal", True)

    def to(self, device: torch.device) -> CachedTargets:
        moved = {
            f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
            for f in fields(self)
        }
        return CachedTargets(**moved)

    def __getitem__(self, rows: slice | torch.Tensor) -> CachedTargets:
        """The entries of a subset of positions (used to chunk over positions)."""
        picked = {
            f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[rows])
            for f in fields(self)
        }
        return CachedTargets(**picked)

    @property
    def has_student(self) -> bool:
        return self.student_logprobs is not None

    @property
    def has_samples(self) -> bool:
        return self.sample_ids is not None


PER_POSITION_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(CachedTargets))
FIELD_KIND: dict[str, str] = {f.name: f.metadata["kind"] for f in fields(CachedTargets)}
# Fields a cache holds only when it was built with the base student (--student).
NEEDS_STUDENT: tuple[str, ...] = tuple(
    f.name for f in fields(CachedTargets) if f.metadata["source"] != "teachers"
)
# The base student's own log-probs and tail mass (what --frozen-student replaces).
STUDENT_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(CachedTargets) if f.metadata["source"] == "student"
)
# The sampled tail's arrays (a cache built with --tail-samples; `distill --tail bucket` drops them).
SAMPLE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(CachedTargets) if f.name.startswith("sample_")
)
# Tail figures computed with the cache's own S0 (the mass-matched shift, the family's exact tail
# masses): valid only for that student, dropped when another one is trained.
CACHED_STUDENT_TAIL_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(CachedTargets) if f.metadata["source"] == "target"
)


# ---------------------------------------------------------------------------------------------
# Names and small helpers
# ---------------------------------------------------------------------------------------------

# The rules' names live in rules.py (no torch: the CLI lists them in its help).


_NEG_INF = float("-inf")


def _compute(tensor: torch.Tensor) -> torch.Tensor:
    """Tensors in the precision the math runs in: float32, or float64 if given (dense references
    in float64 for tests); float16/bfloat16 cache entries are widened."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def scaled_delta(
    tuned_logprobs: torch.Tensor, base_logprobs: torch.Tensor, alpha: float
) -> torch.Tensor:
    """alpha * (lT - lB), with two conventions so no NaN appears: an id both teachers rule out
    (both -inf) gets no shift, and alpha = 0 gives no shift whatever Delta is."""
    if alpha == 0:
        return torch.zeros_like(tuned_logprobs)
    both_ruled_out = torch.isneginf(tuned_logprobs) & torch.isneginf(base_logprobs)
    delta = torch.where(
        both_ruled_out, torch.zeros_like(tuned_logprobs), tuned_logprobs - base_logprobs
    )
    return alpha * delta


def complement_logsumexp(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log sum_{y not in K} exp(values[y]) per row: [N,V], [N,k] -> [N].

    -inf where the complement is empty (K covers V) or holds only -inf. Safe for autograd: rows
    with an empty complement never reach logsumexp's backward (which would give 0 * NaN)."""
    masked = values.scatter(1, ids, _NEG_INF)
    empty = ~(masked > _NEG_INF).any(dim=1)
    safe = torch.where(empty.unsqueeze(1), torch.zeros_like(masked), masked)
    lse = torch.logsumexp(safe, dim=1)
    return torch.where(empty, torch.full_like(lse, _NEG_INF), lse)


def _check_full(name: str, logprobs: torch.Tensor) -> None:
    if logprobs.dim() != 2:
        raise DeltakdError(f"{name} must be [positions, vocab], got shape {tuple(logprobs.shape)}")
    if not torch.is_floating_point(logprobs):
        raise DeltakdError(f"{name} must be a floating-point tensor")
    if torch.isnan(logprobs).any():
        raise DeltakdError(f"{name} contains NaN")


def _check_inputs(
    tuned_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor | None,
) -> None:
    _check_full("tuned_logprobs", tuned_logprobs)
    _check_full("base_logprobs", base_logprobs)
    if base_logprobs.shape != tuned_logprobs.shape:
        raise DeltakdError(
            f"base and tuned log-probs differ in shape: {tuple(base_logprobs.shape)} vs "
            f"{tuple(tuned_logprobs.shape)}"
        )
    if student_logprobs is not None:
        _check_full("student_logprobs", student_logprobs)
        if student_logprobs.shape != tuned_logprobs.shape:
            raise DeltakdError(
                f"student and teacher log-probs differ in shape: {tuple(student_logprobs.shape)} "
                f"vs {tuple(tuned_logprobs.shape)}"
            )


# ---------------------------------------------------------------------------------------------
# Cache time: full-vocabulary log-probs [N,V] of both teachers (and S0) are known
# ---------------------------------------------------------------------------------------------


def exact_delta_target(
    student_logprobs: torch.Tensor,
    tuned_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """Dense reference: log p* = log_softmax(l0 + alpha*(lT - lB)) over the full vocabulary."""
    return torch.log_softmax(
        student_logprobs + scaled_delta(tuned_logprobs, base_logprobs, alpha), dim=-1
    )


def geometric_mix(
    kd_logits: torch.Tensor, delta_logits: torch.Tensor, gamma: float
) -> torch.Tensor:
    """(1 - gamma) * kd_logits + gamma * delta_logits, exactly one of them at gamma 0 or 1 (so a
    -inf in the other, e.g. an empty tail, never meets 0 * -inf = NaN)."""
    if gamma == 0:
        return kd_logits
    if gamma == 1:
        return delta_logits
    return (1.0 - gamma) * kd_logits + gamma * delta_logits


def family_logits_full(
    student_logprobs: torch.Tensor,
    tuned_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    gamma: float,
    alpha: float,
) -> torch.Tensor:
    """Unnormalised log p_gamma,alpha over the full vocabulary [N,V]:
    (1 - gamma) * lT + gamma * (l0 + alpha * (lT - lB)); gamma 0 is pT, gamma 1 the Delta
    target p*."""
    delta_logits = student_logprobs + scaled_delta(tuned_logprobs, base_logprobs, alpha)
    return geometric_mix(tuned_logprobs, delta_logits, gamma)


def exact_family_target(
    student_logprobs: torch.Tensor,
    tuned_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    gamma: float,
    alpha: float,
) -> torch.Tensor:
    """Dense reference: log p_gamma,alpha over the full vocabulary [N,V]."""
    logits = family_logits_full(student_logprobs, tuned_logprobs, base_logprobs, gamma, alpha)
    return torch.log_softmax(logits, dim=-1)


def family_tail_logmass(
    student_logprobs: torch.Tensor,
    tuned_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    ids: torch.Tensor,
    grid: tuple[GridPoint, ...],
) -> torch.Tensor:
    """The exact log tail mass of the family at every grid point [N,G]:

        log sum_{y not in K} exp((1 - gamma) lT(y) + gamma (l0(y) + alpha Delta(y)))

    on the same unnormalised scale as the bucket logits at K (-inf where the tail is empty)."""
    columns = [
        complement_logsumexp(
            family_logits_full(student_logprobs, tuned_logprobs, base_logprobs, gamma, alpha), ids
        )
        for gamma, alpha in grid
    ]
    return torch.stack(columns, dim=1)


def grid_selection_key(
    student_logprobs: torch.Tensor,
    tuned_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    grid: tuple[GridPoint, ...],
) -> torch.Tensor:
    """max over the grid points of log p_gamma,alpha(y) [N,V]. Normalised per grid point, so a
    point whose logits sit on a larger scale does not win every id; an id kept by this key holds
    the most mass of at least one grid point's target."""
    key = None
    for gamma, alpha in grid:
        logprobs = exact_family_target(
            student_logprobs, tuned_logprobs, base_logprobs, gamma, alpha
        )
        key = logprobs if key is None else torch.maximum(key, logprobs)
    return key


def _top_then_fill(first: torch.Tensor, second: torch.Tensor, k: int) -> torch.Tensor:
    """Top k//2 ids of `first`, then the k - k//2 highest of `second` not already chosen."""
    head = k // 2
    chosen = (
        first.topk(head, dim=-1).indices
        if head > 0
        else first.new_empty((first.shape[0], 0), dtype=torch.long)
    )
    taken = torch.zeros_like(second, dtype=torch.bool).scatter(1, chosen, True)
    # Chosen ids get -inf; every other id is clamped above -inf so it always wins over a chosen
    # one, even if its own log-prob is -inf (k <= V guarantees enough unchosen ids).
    lowest = torch.finfo(second.dtype).min
    fill_key = torch.where(taken, torch.full_like(second, _NEG_INF), second.clamp(min=lowest))
    filled = fill_key.topk(k - head, dim=-1).indices
    return torch.cat([chosen, filled], dim=1)


def select_ids(
    tuned_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor | None,
    k: int,
    rule: str,
    alpha: float = 1.0,
    grid: tuple[GridPoint, ...] = (),
) -> torch.Tensor:
    """The kept ids K per position: LongTensor [N,k], unique per row, sorted ascending.

    `rule` is one of SELECTION_RULES; `alpha` is used by "target" only, `grid` by "grid" only.
    k must satisfy 1 <= k <= V (the caller caps k at the vocabulary size)."""
    _check_inputs(tuned_logprobs, base_logprobs, student_logprobs)
    vocab = tuned_logprobs.shape[1]
    if not 1 <= k <= vocab:
        raise DeltakdError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    if rule not in SELECTION_RULES:
        raise DeltakdError(f"unknown id selection rule {rule!r}; choose one of {SELECTION_RULES}")
    if rule in RULES_NEEDING_STUDENT and student_logprobs is None:
        raise DeltakdError(f"id selection rule {rule!r} needs the student's log-probs")
    if rule in RULES_NEEDING_GRID and not grid:
        raise DeltakdError("id selection rule 'grid' needs at least one grid point (gamma, alpha)")
    if rule == "grid":
        ids = grid_selection_key(student_logprobs, tuned_logprobs, base_logprobs, grid)
        ids = ids.topk(k, dim=-1).indices
    elif rule == "target":
        # top-k of p* is top-k of its logits; the softmax normaliser does not change the order
        key = student_logprobs + scaled_delta(tuned_logprobs, base_logprobs, alpha)
        ids = key.topk(k, dim=-1).indices
    elif rule == "tuned":
        ids = tuned_logprobs.topk(k, dim=-1).indices
    elif rule == "tuned+base":
        ids = _top_then_fill(tuned_logprobs, base_logprobs, k)
    else:
        ids = _top_then_fill(tuned_logprobs, student_logprobs, k)
    return ids.sort(dim=-1).values.to(torch.long)


def tail_mass(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Probability mass outside K: [N,V], [N,k] -> [N].

    Summed over the complement (exp of its logsumexp), not 1 - sum_K p, which cancels badly when
    K holds almost all the mass; exactly 0 when K covers the vocabulary."""
    return complement_logsumexp(logprobs, ids).exp()


def mass_matched_tail_shift(
    student_logprobs: torch.Tensor,
    tuned_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    ids: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """The tail constant c [N] with which the cached target's tail mass equals the exact one's:

        c = log sum_{y not in K} p0(y) exp(alpha*Delta(y)) - log sum_{y not in K} p0(y)

    computed in log space; 0 where the tail is empty (nothing to shift)."""
    shifted = student_logprobs + scaled_delta(tuned_logprobs, base_logprobs, alpha)
    log_target_tail = complement_logsumexp(shifted, ids)
    log_student_tail = complement_logsumexp(student_logprobs, ids)
    empty = torch.isneginf(log_student_tail)
    return torch.where(
        empty, torch.zeros_like(log_student_tail), log_target_tail - log_student_tail
    )


def build_cached_targets(
    tuned_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor | None,
    k: int,
    rule: str,
    alpha: float,
    tail_rule: str,
    grid: tuple[GridPoint, ...] = (),
    draws: TailDraws | None = None,
) -> CachedTargets:
    """The cache entries of N positions from full-vocabulary log-probs [N,V].

    tail_rule "mass-matched" needs the student and stores target_tail_shift (valid at this alpha);
    "teacher" stores none (train time uses alpha*(log mT - log mB)). With a student, its
    log-probs at K and its tail mass are stored too, so `distill` need not run S0. With a grid
    of (gamma, alpha) points (needs the student), the family's exact log tail mass at each.
    With `draws`, the sampled tail: `draws.samples` ids drawn with replacement from the tail
    proposal (`sampling.PROPOSALS`: pT's tail, or with the student the even mixture of pT's and
    the Delta target's tails at this alpha) and every stored distribution at the drawn ids."""
    if tail_rule not in TAIL_RULES:
        raise DeltakdError(f"unknown tail rule {tail_rule!r}; choose one of {TAIL_RULES}")
    if tail_rule in TAIL_RULES_NEEDING_STUDENT and student_logprobs is None:
        raise DeltakdError("the mass-matched tail rule needs the student's log-probs")
    if grid and student_logprobs is None:
        raise DeltakdError("a (gamma, alpha) grid needs the student's log-probs")
    ids = select_ids(tuned_logprobs, base_logprobs, student_logprobs, k, rule, alpha, grid)
    family_tail = None
    if grid:
        family_tail = family_tail_logmass(
            student_logprobs, tuned_logprobs, base_logprobs, ids, grid
        )
    shift = None
    if tail_rule == "mass-matched":
        shift = mass_matched_tail_shift(student_logprobs, tuned_logprobs, base_logprobs, ids, alpha)
    sampled = {}
    if draws is not None and draws.samples > 0:
        sampled = sampled_tail_entries(
            tuned_logprobs, base_logprobs, student_logprobs, ids, alpha, draws
        )
    return CachedTargets(
        **sampled,
        ids=ids,
        tuned_logprobs=tuned_logprobs.gather(1, ids),
        base_logprobs=base_logprobs.gather(1, ids),
        tuned_tail=tail_mass(tuned_logprobs, ids),
        base_tail=tail_mass(base_logprobs, ids),
        target_tail_shift=shift,
        student_logprobs=None if student_logprobs is None else student_logprobs.gather(1, ids),
        student_tail=None if student_logprobs is None else tail_mass(student_logprobs, ids),
        family_tail_logmass=family_tail,
    )


@dataclass(frozen=True)
class TailDraws:
    """What keys the sampled tail of N positions: `samples` draws each, the cache's seed, and
    each position's example index and token position (the generator's counters)."""

    samples: int
    seed: int
    example_index: torch.Tensor  # [N]
    position: torch.Tensor  # [N]


SAMPLE_POSITION_CHUNK = 256  # positions whose float64 [n, V] proposal and running sum coexist


def sampled_tail_entries(
    tuned_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor | None,
    ids: torch.Tensor,
    alpha: float,
    draws: TailDraws,
) -> dict[str, torch.Tensor]:
    """The sample_* fields of CachedTargets for N positions (see there). Unused slots hold 0 in
    every log-prob array (they weigh nothing; zeros compress to almost nothing)."""
    if ids.shape[1] >= tuned_logprobs.shape[1]:
        raise DeltakdError("tail samples need a tail: the kept ids cover the whole vocabulary")
    columns: dict[str, list[torch.Tensor]] = {}
    for start in range(0, ids.shape[0], SAMPLE_POSITION_CHUNK):
        rows = slice(start, start + SAMPLE_POSITION_CHUNK)
        target = None
        if student_logprobs is not None:
            target = exact_delta_target(
                student_logprobs[rows], tuned_logprobs[rows], base_logprobs[rows], alpha
            )
        proposal = sampling.tail_proposal_logprobs(tuned_logprobs[rows], ids[rows], target)
        sample_ids, counts = sampling.draw_tail(
            proposal,
            draws.seed,
            draws.example_index[rows],
            draws.position[rows],
            draws.samples,
        )
        sample_ids = sample_ids.to(ids.device)
        used = counts.to(ids.device) > 0
        at_drawn = {
            "sample_tuned_logprobs": tuned_logprobs[rows],
            "sample_base_logprobs": base_logprobs[rows],
        }
        if student_logprobs is not None:
            at_drawn["sample_student_logprobs"] = student_logprobs[rows]
            at_drawn["sample_proposal_logprobs"] = proposal
        entries = {"sample_ids": sample_ids, "sample_counts": counts.to(ids.device)}
        for name, full in at_drawn.items():
            values = full.gather(1, sample_ids.to(full.device)).float().to(ids.device)
            entries[name] = torch.where(used, values, 0.0)
        for name, value in entries.items():
            columns.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in columns.items()}


# ---------------------------------------------------------------------------------------------
# Train time: targets from CachedTargets (temperature is applied by the losses, not here)
# ---------------------------------------------------------------------------------------------


def same_setting(value: float, recorded: float | None) -> bool:
    """Whether a setting (an alpha, a gamma) equals the one a cache recorded, up to float noise:
    a stored tail shift or grid column computed at `recorded` is valid at `value`."""
    if recorded is None:
        return False
    return math.isclose(value, recorded, rel_tol=1e-6, abs_tol=1e-9)


def teacher_tail_shift(cached: CachedTargets, alpha: float) -> torch.Tensor:
    """alpha * (log mT - log mB) per position [N]: Delta taken as constant over the tail.

    0 where either tail mass is 0. Float32 tail masses are exactly 0 when K covers the vocabulary
    (no tail, so the shift multiplies nothing) or, in practice, where a mass underflowed; the
    log-ratio is then -inf, +inf or NaN, and any of those would poison the target through
    inf - inf. 0 means "keep the student's own tail mass", the neutral choice when the teachers
    give no usable information about the tail."""
    tuned_tail = _compute(cached.tuned_tail)
    base_tail = _compute(cached.base_tail)
    usable = (tuned_tail > 0) & (base_tail > 0)
    ones = torch.ones_like(tuned_tail)
    ratio = torch.where(usable, tuned_tail, ones).log() - torch.where(usable, base_tail, ones).log()
    return alpha * ratio


def tail_shift(cached: CachedTargets, alpha: float, cache_alpha: float | None) -> torch.Tensor:
    """The shift [N] applied to the student's log-probs outside K.

    The stored mass-matched shift when the cache has one and alpha equals the cache's alpha;
    otherwise (teacher-only cache, different alpha, or cache_alpha unknown) the teacher rule
    alpha*(log mT - log mB), which is lower fidelity (see docs/method.md)."""
    if cached.target_tail_shift is not None and same_setting(alpha, cache_alpha):
        return _compute(cached.target_tail_shift)
    return teacher_tail_shift(cached, alpha)


def delta_target_logits_full(
    frozen_student_logprobs: torch.Tensor,
    cached: CachedTargets,
    alpha: float,
    shift: torch.Tensor,
) -> torch.Tensor:
    """Unnormalised log p* over the full vocabulary [N,V] (live-S0 path):
    l0 + shift outside K, l0 + alpha*Delta at K."""
    ids = cached.ids
    l0 = _compute(frozen_student_logprobs)
    at_kept = l0.gather(1, ids) + scaled_delta(
        _compute(cached.tuned_logprobs), _compute(cached.base_logprobs), alpha
    )
    return (l0 + _compute(shift).unsqueeze(1)).scatter(1, ids, at_kept)


def delta_target_full(
    frozen_student_logprobs: torch.Tensor,
    cached: CachedTargets,
    alpha: float,
    shift: torch.Tensor,
) -> torch.Tensor:
    """log p* over the full vocabulary [N,V] from the cache and S0's full log-probs (or logits:
    the result is the same, the shift being additive)."""
    return torch.log_softmax(
        delta_target_logits_full(frozen_student_logprobs, cached, alpha, shift), dim=-1
    )


def delta_target_bucket_logits(
    cached: CachedTargets, alpha: float, shift: torch.Tensor
) -> torch.Tensor:
    """Unnormalised log p* over K plus one tail bucket [N,k+1] from the cached student:
    l0_K + alpha*Delta_K, then log(student_tail) + shift (-inf when the tail is empty)."""
    if not cached.has_student or cached.student_tail is None:
        raise DeltakdError("the bucketed Delta target needs a cache with the student's log-probs")
    at_kept = _compute(cached.student_logprobs) + scaled_delta(
        _compute(cached.tuned_logprobs), _compute(cached.base_logprobs), alpha
    )
    bucket = _compute(cached.student_tail).log() + _compute(shift)  # log 0 = -inf: empty tail
    return torch.cat([at_kept, bucket.unsqueeze(1)], dim=1)


def kd_target_bucket_logits(cached: CachedTargets) -> torch.Tensor:
    """log pT at K and log(tuned_tail) as the tail bucket [N,k+1], not renormalised."""
    tail = _compute(cached.tuned_tail).log()  # log 0 = -inf: empty tail
    return torch.cat([_compute(cached.tuned_logprobs), tail.unsqueeze(1)], dim=1)


def grid_column(grid: tuple[GridPoint, ...], gamma: float, alpha: float) -> int | None:
    """The column of (gamma, alpha) in a cache's grid (float match within 1e-6 relative), or
    None when the point is not in the grid."""
    for column, (grid_gamma, grid_alpha) in enumerate(grid):
        if same_setting(gamma, grid_gamma) and same_setting(alpha, grid_alpha):
            return column
    return None


def family_target_bucket_logits(
    cached: CachedTargets,
    gamma: float,
    alpha: float,
    shift: torch.Tensor,
    exact_log_tail: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unnormalised log p_gamma,alpha over K plus one tail bucket [N,k+1]:

        at K:      (1 - gamma) * lT + gamma * (l0 + alpha * Delta)
        the tail:  exact_log_tail when given (the cache's stored family tail for this grid
                   point), else the fallback (1 - gamma) * log mT + gamma * (log m0 + shift)

    i.e. the geometric mix of the KD and Delta bucket logits. The fallback is an upper bound on
    the exact tail (Hölder: sum a^(1-gamma) b^gamma <= (sum a)^(1-gamma) (sum b)^gamma, with the
    Delta tail exact when `shift` is the mass-matched one) and exact at gamma 0 and 1."""
    logits = kd_target_bucket_logits(cached)
    if gamma != 0:  # the Delta side needs the base student; the teacher's point does not
        logits = geometric_mix(logits, delta_target_bucket_logits(cached, alpha, shift), gamma)
    if exact_log_tail is None:
        return logits
    return torch.cat([logits[:, :-1], _compute(exact_log_tail).unsqueeze(1)], dim=1)


# ---------------------------------------------------------------------------------------------
# Train time, sampled tail: the target on K plus the drawn ids (docs/method.md, "An unbiased tail")
# ---------------------------------------------------------------------------------------------


def sample_log_weights(cached: CachedTargets) -> torch.Tensor:
    """The importance weights log(c_j / (M q(j))) of the drawn ids [N,M] (-inf: unused slot). q
    is the stored proposal, or for the tuned proposal pT / m_T from the stored values (so kd's
    t_hat = c_j m_T / M holds to rounding)."""
    if cached.sample_proposal_logprobs is not None:
        log_proposal = _compute(cached.sample_proposal_logprobs)
    else:
        tuned_tail = _compute(cached.tuned_tail)
        log_tail = torch.where(tuned_tail > 0, tuned_tail, 1.0).log()
        log_proposal = _compute(cached.sample_tuned_logprobs) - log_tail.unsqueeze(1)
        # No tail mass, nothing drawn: the counts are 0 there already; keep the weight finite.
        log_proposal = torch.where((tuned_tail > 0).unsqueeze(1), log_proposal, 0.0)
    return sampling.importance_log_weights(cached.sample_counts, log_proposal)


def drawn_family_logits(cached: CachedTargets, gamma: float, alpha: float) -> torch.Tensor:
    """Unnormalised log p_gamma,alpha at the drawn ids [N,M], on the scale of the head's logits:
    (1 - gamma) lT + gamma (l0 + alpha Delta); gamma 0 needs no student (it is lT)."""
    tuned = _compute(cached.sample_tuned_logprobs)
    if gamma == 0:
        return tuned
    if cached.sample_student_logprobs is None:
        raise DeltakdError(
            "this target needs the base student's log-probs at the drawn ids: use a cache built "
            "with the student, or give the frozen student"
        )
    return family_logits_full(
        _compute(cached.sample_student_logprobs),
        tuned,
        _compute(cached.sample_base_logprobs),
        gamma,
        alpha,
    )


def exact_family_log_tail(
    cached: CachedTargets,
    gamma: float,
    alpha: float,
    cache_alpha: float | None,
    cache_grid: tuple[GridPoint, ...] = (),
) -> torch.Tensor | None:
    """The exact unnormalised log tail mass [N] of p_gamma,alpha (the scale of the head's logits)
    when the cache knows it, else None:

        gamma 0 (kd)                   log m_T, always
        a grid point of the cache      its stored family tail
        gamma 1 at the cache's alpha   log m0 + the stored mass-matched shift (the cache's S0)

    Where it is known the sampled target's normaliser is exact and its weights plain; elsewhere
    they must be self-normalised."""
    if gamma == 0:
        return _compute(cached.tuned_tail).log()
    column = grid_column(cache_grid, gamma, alpha)
    if cached.family_tail_logmass is not None and column is not None:
        return _compute(cached.family_tail_logmass[:, column])
    exact_shift = cached.target_tail_shift is not None and same_setting(alpha, cache_alpha)
    if gamma == 1 and exact_shift and cached.student_tail is not None:
        return _compute(cached.student_tail).log() + _compute(cached.target_tail_shift)
    return None


def bucket_logprobs(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Aggregate full-vocabulary log-probs [N,V] into K plus one tail bucket [N,k+1]."""
    return torch.cat(
        [logprobs.gather(1, ids), complement_logsumexp(logprobs, ids).unsqueeze(1)], dim=1
    )
