"""What a loss is asked to compute, in words the CLI and the registry can hold without torch: the
tail estimator (`Tail`), the objective's target (`TargetSpec`) and what the cache says about its
targets (`CacheFacts`). The math that uses them is in view.py."""

from __future__ import annotations

from dataclasses import dataclass

from deltakd_cli.errors import DeltakdError
from deltakd_cli.method.rules import GridPoint

TAIL_NAMES: tuple[str, ...] = ("bucket", "sampled", "corrected")


@dataclass(frozen=True)
class Tail:
    """A tail estimator: `baseline` is the share of the target's tail mass the bucket carries
    (1: the bucket alone; 0: none, the plain sampled tail; beta: the corrected tail), and
    `uses_draws` whether the cache's drawn ids enter the loss."""

    name: str
    baseline: float
    uses_draws: bool

    @property
    def label(self) -> str:
        """How records and cards name it: "corrected (beta 0.5)" for a partial correction."""
        if self.name == "corrected" and self.baseline != 1.0:
            return f"corrected (beta {self.baseline:g})"
        return self.name


def tail_estimator(name: str, beta: float = 1.0) -> Tail:
    """The tail estimator called `name`; `beta` is read by "corrected" only."""
    if name == "bucket":
        return Tail("bucket", 1.0, False)
    if name == "sampled":
        return Tail("sampled", 0.0, True)
    if name == "corrected":
        if not 0.0 <= beta <= 1.0:
            raise DeltakdError(f"the corrected tail's beta must be between 0 and 1, got {beta}")
        return Tail("corrected", float(beta), True)
    raise DeltakdError(f"unknown tail estimator {name!r}; choose one of {TAIL_NAMES}")


@dataclass(frozen=True)
class TargetSpec:
    """What an objective's target is: a mixture, in probability, of points of the KD-to-Delta
    family, `points` = ((share, gamma), ...) with shares summing to 1, at the shift scale
    `alpha`. log p_gamma ∝ (1 - gamma) lT + gamma (l0 + alpha Delta): gamma 0 is the tuned
    teacher (kd), gamma 1 the Delta target (delta)."""

    points: tuple[tuple[float, float], ...] = ((1.0, 0.0),)
    alpha: float = 1.0

    @property
    def needs_student(self) -> bool:
        return any(gamma != 0 for _, gamma in self.points)


TUNED_TEACHER = TargetSpec()


@dataclass(frozen=True)
class CacheFacts:
    """What the cache tells the view besides its per-position arrays: the alpha of its
    mass-matched tail, its family grid, and the temperature its distributions are stored at."""

    alpha: float | None = None
    grid: tuple[GridPoint, ...] = ()
    temperature: float = 1.0
