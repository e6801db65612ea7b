"""Pure tensor functions for the distillation targets: choosing the kept ids, tail masses, the
KD and Delta targets built from cached entries, and the dense full-vocabulary references.

No I/O here. Shapes: N target positions, V vocabulary, k kept ids per position."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class CachedTargets:
    """What the cache holds for N target positions (torch tensors, float32 unless noted).

    ids:              [N, k] int64, the kept token ids K
    tuned_logprobs:   [N, k] log pT at K (normalised over the full vocabulary)
    base_logprobs:    [N, k] log pB at K
    tuned_tail:       [N]    pT mass outside K  (1 - sum_K pT, computed over the complement)
    base_tail:        [N]    pB mass outside K
    target_tail_shift:[N]    mass-matched tail shift c at the cache's alpha, or None
    student_logprobs: [N, k] log p0 (base student) at K, or None (teacher-only cache)
    student_tail:     [N]    p0 mass outside K, or None
    """

    ids: torch.Tensor
    tuned_logprobs: torch.Tensor
    base_logprobs: torch.Tensor
    tuned_tail: torch.Tensor
    base_tail: torch.Tensor
    target_tail_shift: torch.Tensor | None = None
    student_logprobs: torch.Tensor | None = None
    student_tail: torch.Tensor | None = None

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
