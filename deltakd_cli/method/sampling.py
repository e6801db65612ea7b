"""The sampled tail of a cache: ids drawn with replacement from a proposal over the ids outside
the kept head K, their counts, and the importance weights that make the cached target unbiased
(docs/method.md, "An unbiased tail").

Pure functions, no I/O. The draws are a deterministic function of (seed, example index, position,
draw number) and of the proposal's values: a counter-based generator gives each draw its uniform
number, and the draw inverts a float64 running sum of the proposal over the tail in id order. No
generator state is carried from one batch to the next, so resuming a cache, another batch size or
another world size draws the same ids (at equal numerics of the proposal).

Shapes: N positions, V vocabulary, k kept ids, M draws per position (also the number of stored
slots: the unique drawn ids come first, the unused slots have count 0)."""

from __future__ import annotations

import math

import numpy as np
import torch

PROPOSALS: tuple[str, ...] = ("tuned", "tuned+target")
"""Where the tail's ids are drawn from (q, over the ids outside K, renormalised):

tuned          pT's tail; kd's importance weights pT/q are all m_T. A teacher-only cache's.
tuned+target   1/2 pT's tail + 1/2 the Delta target p*'s tail (at the cache's alpha, from the base
               student): the weights of kd and of Delta stay at most 2 (times the tail mass), and
               every point of the KD-to-Delta family between them is served by a proposal close to
               it. Needs the base student.
"""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser over uint64 arrays (wrapping arithmetic is the point)."""
    with np.errstate(over="ignore"):
        z = values + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
        return z ^ (z >> np.uint64(31))


def counter_uniforms(
    seed: int, example_index: np.ndarray, position: np.ndarray, draws: int
) -> np.ndarray:
    """Uniform numbers in [0, 1) [N, draws], float64 with 53 random bits, one per (seed, example,
    position, draw): a hash of the four numbers, so any subset of positions can be drawn alone."""
    key = _splitmix64(np.asarray([seed], dtype=np.uint64))
    key = _splitmix64(key ^ np.asarray(example_index, dtype=np.int64).astype(np.uint64))
    key = _splitmix64(key ^ np.asarray(position, dtype=np.int64).astype(np.uint64))
    counters = np.arange(draws, dtype=np.uint64)
    bits = _splitmix64(key[:, None] ^ (counters[None, :] * _GOLDEN))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def tail_proposal_logprobs(
    tuned_logprobs: torch.Tensor,
    ids: torch.Tensor,
    target_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """log q over the vocabulary [N, V]: -inf on K, and on the tail pT's tail renormalised, or with
    `target_logprobs` (normalised log-probs of the Delta target) the even mixture of the two
    renormalised tails. float64 (the draws invert its running sum). Rows whose tail holds no mass
    are all -inf (nothing is drawn there)."""

    def renormalised_tail(logprobs: torch.Tensor) -> torch.Tensor:
        masked = logprobs.double().scatter(1, ids, float("-inf"))
        log_mass = torch.logsumexp(masked, dim=1, keepdim=True)
        usable = torch.isfinite(log_mass)
        return torch.where(usable, masked - torch.where(usable, log_mass, 0.0), float("-inf"))

    tuned = renormalised_tail(tuned_logprobs)
    if target_logprobs is None:
        return tuned
    target = renormalised_tail(target_logprobs)
    half = math.log(0.5)
    mixed = torch.logaddexp(tuned + half, target + half)
    # A row where one tail is empty draws from the other alone.
    return torch.where(
        torch.isneginf(tuned).all(dim=1, keepdim=True),
        target,
        torch.where(torch.isneginf(target).all(dim=1, keepdim=True), tuned, mixed),
    )


def draw_from_tail(proposal_logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Ids [N, M] drawn with replacement from q = exp(proposal_logprobs) [N, V] by inverting its
    float64 running sum in id order at the uniforms [N, M]; -1 in rows where q has no mass."""
    cdf = torch.cumsum(proposal_logprobs.double().exp(), dim=1)
    total = cdf[:, -1:]
    drawn = torch.searchsorted(cdf, uniforms.to(cdf.device, torch.float64) * total, right=True)
    # u < 1, but u * total may round up to total: the last id with mass is the right answer.
    drawn = drawn.clamp(max=proposal_logprobs.shape[1] - 1)
    last_with_mass = (proposal_logprobs > float("-inf")).cumsum(dim=1).argmax(dim=1, keepdim=True)
    drawn = torch.minimum(drawn, last_with_mass)
    empty = ~(total > 0) | ~torch.isfinite(total)
    return torch.where(empty, torch.full_like(drawn, -1), drawn)


def unique_with_counts(drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws [N, M] (-1: none) -> (ids [N, M], counts [N, M]): each row's distinct ids ascending in
    its first slots with how often each was drawn; the unused slots repeat the row's last id (so
    the delta-coded ids gain only zero gaps) with count 0. A row without draws is all 0."""
    ordered = drawn.sort(dim=1).values  # the -1s (no draw) come first
    valid = ordered >= 0
    previous = torch.cat([ordered.new_full((ordered.shape[0], 1), -2), ordered[:, :-1]], dim=1)
    starts = valid & (ordered != previous)
    slot = (starts.long().cumsum(dim=1) - 1).clamp(min=0)
    counts = torch.zeros_like(ordered).scatter_add(1, slot, valid.long())
    slots = ordered.shape[1]
    largest = ordered.max(dim=1, keepdim=True).values.clamp(min=0)
    # One spare column takes every entry that starts no run, then is dropped.
    ids = torch.cat([largest.expand_as(ordered), largest], dim=1)
    ids = ids.scatter(1, torch.where(starts, slot, slots), ordered.clamp(min=0))
    return ids[:, :slots], counts


def draw_tail(
    proposal_logprobs: torch.Tensor,
    seed: int,
    example_index: torch.Tensor,
    position: torch.Tensor,
    draws: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored draws of N positions: (unique ids [N, M], counts [N, M]) from `draws` draws with
    replacement from q, keyed by (seed, example index, position, draw)."""
    uniforms = counter_uniforms(seed, example_index.cpu().numpy(), position.cpu().numpy(), draws)
    drawn = draw_from_tail(proposal_logprobs, torch.from_numpy(uniforms))
    return unique_with_counts(drawn)


def importance_log_weights(counts: torch.Tensor, proposal_logprobs: torch.Tensor) -> torch.Tensor:
    """log(c_j / (M q(j))) per stored slot [N, M], M = the row's number of draws; -inf in unused
    slots (count 0), so they weigh nothing. With these weights sum_j w_j f(j) is an unbiased
    estimate of the tail sum of f for any f (docs/method.md)."""
    counts = counts.float()
    total = counts.sum(dim=1, keepdim=True)
    used = counts > 0
    log_counts = torch.where(used, counts, 1.0).log()
    weights = log_counts - torch.where(total > 0, total, 1.0).log() - proposal_logprobs.float()
    return torch.where(used, weights, float("-inf"))


def effective_sample_size(log_weighted_target: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size per row [N] of self-normalised weights given in log space
    [N, M] (-inf: unused): (sum w)^2 / sum w^2, between 1 and the number of used slots; 0 in rows
    without draws. Count-weighted slots count once per draw through their weight's count factor."""
    finite = torch.isfinite(log_weighted_target)
    safe = torch.where(finite, log_weighted_target, float("-inf"))
    top = safe.max(dim=1, keepdim=True).values
    top = torch.where(torch.isfinite(top), top, 0.0)
    scaled = torch.where(finite, (safe - top).exp(), 0.0)
    first, second = scaled.sum(dim=1), (scaled**2).sum(dim=1)
    return torch.where(second > 0, first**2 / second.clamp_min(1e-30), 0.0)
