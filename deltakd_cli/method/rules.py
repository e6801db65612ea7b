"""The names of the cache's target rules: how the kept ids K are chosen, how the tail is set,
which need the base student or a KD-to-Delta grid, and the defaults. Standard library only: the
CLI builds its options from these without importing torch (the math is in targets.py)."""

from __future__ import annotations

SELECTION_RULES: tuple[str, ...] = ("target", "tuned", "tuned+base", "tuned+student", "grid")
"""How the kept ids K are chosen at cache time (full vocabulary known):

target         top-k of the exact Delta target p* = softmax(l0 + alpha*(lT - lB)) (needs S0)
tuned          top-k of the tuned teacher lT
tuned+base     top k//2 of lT, the rest the highest lB not already chosen
tuned+student  top k//2 of lT, the rest the highest l0 not already chosen (needs S0)
grid           top-k of max over the grid points (gamma, alpha) of the normalised family target
               p_gamma,alpha (needs S0 and a grid; one K serves every grid point)
"""

TAIL_RULES: tuple[str, ...] = ("mass-matched", "teacher")
"""How Delta is set outside K (the tail):

mass-matched   c = log sum_tail p0 e^{alpha*Delta} - log sum_tail p0, stored at cache time, so the
               cached target's tail mass equals the exact target's (needs S0; valid at that alpha)
teacher        alpha * (log mT - log mB), from the two teachers' tail masses (any alpha)
"""

# The cache's default shape (docs/method.md, "Which cache and tail for which objective"): the exact
# top-k head plus this many draws from the tail. One cache serves both families: the draws give
# every objective an unbiased tail (KD's sampled, the Delta family's corrected), and the head is
# wide enough that the bucket the corrected tail builds on is near the old top-64 one (one-cache
# gradient cosine at S0 0.985 against 0.988; bench/tail_fidelity.py), within 300 bytes per token.
DEFAULT_TOP_K = 48
DEFAULT_TAIL_SAMPLES = 16

RULES_NEEDING_STUDENT: frozenset[str] = frozenset({"target", "tuned+student", "grid"})
RULES_NEEDING_GRID: frozenset[str] = frozenset({"grid"})

GridPoint = tuple[float, float]
"""One point (gamma, alpha) of the KD-to-Delta family: log p ∝ (1-gamma) lT + gamma (l0 + alpha
Delta). A cache's grid is a tuple of them, in the order the manifest lists them."""
TAIL_RULES_NEEDING_STUDENT: frozenset[str] = frozenset({"mass-matched"})


def default_rules(has_student: bool, has_grid: bool = False) -> tuple[str, str]:
    """(selection, tail rule) when none is asked for: the exact target's top-k and the
    mass-matched tail with the base student (the measured best, docs/method.md), else the tuned
    teacher's top-k and the teachers' tail. With a family grid, ids that serve every grid point."""
    if has_grid:
        return ("grid", "mass-matched")
    return ("target", "mass-matched") if has_student else ("tuned", "teacher")
