"""Held-out quality of trained students, computed one way for every system (bench/trl_bench.py).

Teacher forced on the reference response of held-out rows, at the response positions only (the
positions `data.target_positions` names: one per response token, EOS included), over the full
vocabulary:

  kl(teacher || student) per response token, nats  (how close a distilled student is)
  cross-entropy of the reference token, nats         (how well an SFT student fits the data)

Per-token figures are sums over all held-out positions divided by their count. Noise is a paired
bootstrap over rows: the same resampled rows for both models, the per-token mean of each taken on
the resample (ratio of sums), and the percentile interval of their difference."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from deltakd_cli.data import TokenizedExample, target_positions


def kl_per_position(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row [N] from full-vocabulary log-probs [N, V]; terms where the
    teacher has zero probability count 0 (0 log 0 = 0), whatever the student's log-prob."""
    if teacher_logprobs.shape != student_logprobs.shape or teacher_logprobs.dim() != 2:
        raise ValueError(
            f"log-probs must be two [N, V] tensors of one shape: "
            f"{tuple(teacher_logprobs.shape)}, {tuple(student_logprobs.shape)}"
        )
    teacher = teacher_logprobs.double()
    student = student_logprobs.double()
    probs = teacher.exp()
    support = probs > 0
    terms = torch.where(support, probs * (teacher - student), torch.zeros_like(teacher))
    return terms.sum(dim=-1)


def kl_bucket_and_tail_per_position(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, k: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full KL split at the teacher's top-k ids K [N] each: KL(teacher || student) =
    the KL of the two coarsened to K + one tail bucket (what a bucket cache trains) + m_T times
    the KL of their renormalised tails (the within-tail term a bucket never trains)."""
    teacher, student = teacher_logprobs.double(), student_logprobs.double()
    ids = teacher.topk(min(k, teacher.shape[1]), dim=1).indices
    in_head = torch.zeros_like(teacher, dtype=torch.bool).scatter(1, ids, True)
    minus_inf = torch.full_like(teacher, float("-inf"))
    teacher_tail = torch.logsumexp(torch.where(in_head, minus_inf, teacher), dim=1)
    student_tail = torch.logsumexp(torch.where(in_head, minus_inf, student), dim=1)
    coarse_teacher = torch.cat([teacher.gather(1, ids), teacher_tail[:, None]], dim=1)
    coarse_student = torch.cat([student.gather(1, ids), student_tail[:, None]], dim=1)
    bucket = kl_per_position(coarse_teacher, coarse_student)
    return bucket, kl_per_position(teacher, student) - bucket


def cross_entropy_per_position(logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log p(label) per row [N] from log-probs [N, V]."""
    return -logprobs.double().gather(1, labels[:, None].long()).squeeze(1)


@torch.inference_mode()
def response_logprobs(
    model: Any, examples: Sequence[TokenizedExample], vocab_size: int
) -> list[torch.Tensor]:
    """Per example, the model's log-probs [n_targets, vocab] at its response positions (one
    example at a time: no padding, so nothing depends on how rows are batched)."""
    model.eval()
    out = []
    for example in examples:
        ids = torch.tensor([example.input_ids])
        positions = target_positions(example.target_mask)
        positions = torch.from_numpy(positions)
        logits = model(input_ids=ids).logits[0, positions, :vocab_size]
        out.append(torch.log_softmax(logits.float(), dim=-1))
    return out


def response_labels(examples: Sequence[TokenizedExample]) -> list[torch.Tensor]:
    """The reference token each response position predicts."""
    labels = []
    for example in examples:
        positions = target_positions(example.target_mask)
        labels.append(torch.tensor(example.input_ids)[torch.from_numpy(positions) + 1])
    return labels


def per_row_sums(values: Iterable[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(sum over each row's positions, positions per row) from per-position values per row."""
    values = list(values)
    sums = np.array([float(v.sum()) for v in values], dtype=np.float64)
    counts = np.array([v.numel() for v in values], dtype=np.float64)
    return sums, counts


def paired_token_bootstrap(
    a_sums: Sequence[float],
    b_sums: Sequence[float],
    counts: Sequence[float],
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Per-token means of two models on the same rows (sum / positions), the difference b - a,
    and its percentile bootstrap interval over rows (rows resampled with replacement, the same
    rows for both; each resample's per-token means are ratios of sums). `within_noise`: the
    interval contains 0."""
    a = np.asarray(a_sums, dtype=np.float64)
    b = np.asarray(b_sums, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.shape != n.shape or a.size == 0:
        raise ValueError(
            f"need three 1-D arrays of one non-zero length: {a.shape}, {b.shape}, {n.shape}"
        )
    if (n <= 0).any():
        raise ValueError("every row needs at least one position")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, a.size, size=(n_resamples, a.size))
    tokens = n[picks].sum(axis=1)
    differences = (b[picks].sum(axis=1) - a[picks].sum(axis=1)) / tokens
    return _interval(a.sum() / n.sum(), b.sum() / n.sum(), differences, confidence, n)


def _interval(
    mean_a: float, mean_b: float, differences: np.ndarray, confidence: float, counts: np.ndarray
) -> dict[str, Any]:
    """The means, b - a, and the percentile interval of the resampled differences."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(differences, [tail, 1.0 - tail])
    return {
        "a": float(mean_a),
        "b": float(mean_b),
        "difference": float(mean_b - mean_a),
        "ci_low": float(low),
        "ci_high": float(high),
        "within_noise": bool(low <= 0.0 <= high),
        "confidence": confidence,
        "n_resamples": int(differences.size),
        "rows": int(counts.size),
        "positions": int(counts.sum()),
    }


def seeds_and_rows_bootstrap(
    a_runs: Sequence[Sequence[float]],
    b_runs: Sequence[Sequence[float]],
    counts: Sequence[float],
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Two systems, each trained several times (one run per data-order seed), scored on the same
    rows: the per-token mean of each system over its runs, the difference b - a, and a two-level
    percentile bootstrap of it. Each resample draws every system's runs with replacement (the
    training-order noise: which batches a student happened to see) and the rows with replacement
    (the test-set noise, the same rows for every run). `within_noise`: the interval contains 0.

    a_runs, b_runs: per run, the per-row sums of the metric [rows]; counts: positions per row."""
    a = np.asarray(a_runs, dtype=np.float64)
    b = np.asarray(b_runs, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != n.size or b.shape[1] != n.size or n.size == 0:
        raise ValueError(
            f"need [runs, rows] sums for both systems and [rows] counts: {a.shape}, {b.shape}, "
            f"{n.shape}"
        )
    if (n <= 0).any():
        raise ValueError("every row needs at least one position")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n.size, size=(n_resamples, n.size))
    tokens = n[rows].sum(axis=1)

    def resampled_means(runs: np.ndarray) -> np.ndarray:
        picks = rng.integers(0, runs.shape[0], size=(n_resamples, runs.shape[0]))
        # per resample: mean over the drawn runs of each run's per-token mean on the drawn rows
        per_run = runs[picks[:, :, None], rows[:, None, :]].sum(axis=2) / tokens[:, None]
        return per_run.mean(axis=1)

    differences = resampled_means(b) - resampled_means(a)
    per_run_a, per_run_b = a.sum(axis=1) / n.sum(), b.sum(axis=1) / n.sum()
    result = _interval(per_run_a.mean(), per_run_b.mean(), differences, confidence, n)
    return {**result, "a_runs": per_run_a.tolist(), "b_runs": per_run_b.tolist()}


def paired_seeds_and_rows_bootstrap(
    a_runs: Sequence[Sequence[float]],
    b_runs: Sequence[Sequence[float]],
    counts: Sequence[float],
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Two systems trained in pairs (run i of each on the same batch sequence), scored on the same
    rows: b - a per token, with a two-level percentile bootstrap that draws the PAIRS with
    replacement (the same seeds for both systems, so the batch-order noise they share cancels)
    and the rows with replacement. `within_noise`: the interval contains 0.

    a_runs, b_runs: per run, the per-row sums of the metric [runs, rows], run i of a paired with
    run i of b; counts: positions per row."""
    a = np.asarray(a_runs, dtype=np.float64)
    b = np.asarray(b_runs, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[1] != n.size or n.size == 0:
        raise ValueError(f"need paired [runs, rows] sums and [rows] counts: {a.shape}, {b.shape}")
    if (n <= 0).any():
        raise ValueError("every row needs at least one position")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n.size, size=(n_resamples, n.size))
    pairs = rng.integers(0, a.shape[0], size=(n_resamples, a.shape[0]))
    tokens = n[rows].sum(axis=1)
    gap = b - a
    per_pair = gap[pairs[:, :, None], rows[:, None, :]].sum(axis=2) / tokens[:, None]
    differences = per_pair.mean(axis=1)
    per_run_a, per_run_b = a.sum(axis=1) / n.sum(), b.sum(axis=1) / n.sum()
    result = _interval(per_run_a.mean(), per_run_b.mean(), differences, confidence, n)
    return {**result, "a_runs": per_run_a.tolist(), "b_runs": per_run_b.tolist(),
            "per_seed_differences": (per_run_b - per_run_a).tolist()}  # fmt: skip
