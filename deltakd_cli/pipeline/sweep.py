"""`pipeline --sweep gamma=0,0.5,1 [--sweep alpha=1,2]`: one student per point of the KD-to-Delta
family (docs/method.md), all from one cache that keeps each point's tail. The point reported as
chosen is the one with the best ROUGE-L on the held-out rows of the training data (validation);
the test rows are only ever scored, for every point, never used to choose."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from deltakd_cli.errors import DeltakdError
from deltakd_cli.options import parse_numbers

SWEPT = ("gamma", "alpha")


def exact_text(number: float) -> str:
    """The shortest text of a number that reads back as the same float: 0.5 and 1 stay short,
    0.1234567 keeps every digit (two points never share a role name)."""
    short = f"{number:g}"
    return short if float(short) == number else repr(float(number))


@dataclass(frozen=True)
class SweepPoint:
    gamma: float
    alpha: float

    def role(self, alphas_swept: bool) -> str:
        name = f"student-gamma{exact_text(self.gamma)}"
        return name + (f"-alpha{exact_text(self.alpha)}" if alphas_swept else "")

    def label(self, alphas_swept: bool) -> str:
        if self.gamma == 0:
            what = "KD (gamma 0)"
        elif self.gamma == 1:
            what = "Delta-KD (gamma 1)"
        else:
            what = f"KD->Delta gamma {exact_text(self.gamma)}"
        alpha = f", alpha {exact_text(self.alpha)}" if alphas_swept else ""
        return what + alpha + " student"


def _numbers(name: str, text: str) -> list[float]:
    values = list(parse_numbers(f"--sweep {name}=...", text))
    for value in values:
        if name == "gamma" and not 0.0 <= value <= 1.0:
            raise DeltakdError(f"--sweep gamma=...: {value:g} is outside [0, 1]")
    return values


def parse_sweep(specs: list[str], alpha: float) -> tuple[list[SweepPoint], bool]:
    """The grid of `--sweep NAME=V1,V2,...` (gamma, alpha; every combination), and whether
    alpha is swept; alpha is --alpha unless swept. [] when there is no --sweep."""
    if not specs:
        return [], False
    values: dict[str, list[float]] = {}
    for spec in specs:
        name, sep, listed = spec.partition("=")
        name = name.strip().lower()
        if not sep or name not in SWEPT or not listed.strip():
            raise DeltakdError(
                f"--sweep {spec!r}: give NAME=V1,V2,... with NAME one of {', '.join(SWEPT)} "
                "(e.g. --sweep gamma=0,0.5,1)"
            )
        if name in values:
            raise DeltakdError(f"--sweep {name} is given twice")
        values[name] = _numbers(name, listed)
    gammas = values.get("gamma", [1.0])
    alphas = values.get("alpha", [alpha])
    points = [SweepPoint(g, a) for g, a in itertools.product(gammas, alphas)]
    if len(points) < 2:
        raise DeltakdError("--sweep needs at least two points to choose from")
    return points, "alpha" in values


def choose(validation_groups: list[dict[str, Any]], roles: dict[str, SweepPoint]) -> str:
    """The role of the best point on validation: the highest mean ROUGE-L of its group (its
    seeds' mean); a tie goes to the first in the grid's order. Only the validation report's
    groups are read: the choice cannot see a test row."""
    means = {line["name"]: line["mean"] for line in validation_groups}
    missing = [role for role in roles if role not in means]
    if missing:
        raise DeltakdError(f"the validation report has no score for {', '.join(missing)}")
    return max(roles, key=lambda role: (means[role], -list(roles).index(role)))
