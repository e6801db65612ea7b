"""`pipeline --sweep`: the grid it parses and the choice it makes on validation only."""

from __future__ import annotations

import pytest

from deltakd_cli.errors import DeltakdError
from deltakd_cli.pipeline.sweep import SweepPoint, choose, parse_sweep


def test_a_gamma_sweep_keeps_alpha_and_names_each_point():
    points, alphas_swept = parse_sweep(["gamma=0,0.5,1"], alpha=1.5)
    assert points == [SweepPoint(0.0, 1.5), SweepPoint(0.5, 1.5), SweepPoint(1.0, 1.5)]
    assert not alphas_swept
    assert [p.role(False) for p in points] == [
        "student-gamma0", "student-gamma0.5", "student-gamma1"
    ]  # fmt: skip
    assert points[0].label(False) == "KD (gamma 0) student"
    assert points[2].label(False) == "Delta-KD (gamma 1) student"


def test_gamma_and_alpha_sweep_every_combination():
    points, alphas_swept = parse_sweep(["gamma=0.5,1", "alpha=1,2"], alpha=1.0)
    assert alphas_swept and len(points) == 4
    assert points[1].role(True) == "student-gamma0.5-alpha2"


@pytest.mark.parametrize(
    "specs, fragment",
    [
        (["gamma=0,2"], "outside [0, 1]"),
        (["gamma=0,x"], "'x' is not a number"),
        (["beta=1,2"], "NAME one of gamma, alpha"),
        (["gamma"], "NAME=V1,V2"),
        (["gamma=1", "gamma=0"], "given twice"),
        (["gamma=0.5"], "at least two points"),
        (["alpha=1,nan"], "finite"),
    ],
)
def test_bad_sweeps_are_one_line(specs, fragment):
    with pytest.raises(DeltakdError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        parse_sweep(specs, alpha=1.0)


def test_the_choice_reads_validation_scores_only_and_breaks_ties_by_grid_order():
    points, _ = parse_sweep(["gamma=0,0.5,1"], alpha=1.0)
    roles = {p.role(False): p for p in points}
    validation = [
        {"name": "student-sft", "mean": 40.0},  # not a sweep point: never chosen
        {"name": "student-gamma0", "mean": 20.0},
        {"name": "student-gamma0.5", "mean": 25.0},
        {"name": "student-gamma1", "mean": 25.0},
    ]
    assert choose(validation, roles) == "student-gamma0.5"
    with pytest.raises(DeltakdError, match="no score for student-gamma1"):
        choose(validation[:3], roles)
