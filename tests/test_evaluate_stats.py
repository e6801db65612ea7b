"""evaluate/stats.py: the paired bootstrap and the spread, against simulations and hand sums."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from deltakd_cli.evaluate import stats


def test_bootstrap_covers_the_true_difference_at_about_the_stated_rate():
    rng = np.random.default_rng(1234)
    true_difference, covered, datasets = 2.0, 0, 200
    for index in range(datasets):
        shared = rng.normal(30.0, 10.0, size=50)  # row difficulty both models share
        a = shared + rng.normal(0.0, 6.0, size=50)
        b = shared + true_difference + rng.normal(0.0, 6.0, size=50)
        result = stats.paired_bootstrap(a, b, n_resamples=1000, seed=index)
        covered += result["ci_low"] <= true_difference <= result["ci_high"]
    assert 0.88 <= covered / datasets <= 0.99


def test_bootstrap_is_reproducible_and_centred():
    rng = np.random.default_rng(0)
    a, b = rng.normal(20, 5, size=40), rng.normal(22, 5, size=40)
    first = stats.paired_bootstrap(a, b, n_resamples=2000, seed=7)
    again = stats.paired_bootstrap(a, b, n_resamples=2000, seed=7)
    other = stats.paired_bootstrap(a, b, n_resamples=2000, seed=8)
    assert first == again
    assert (first["ci_low"], first["ci_high"]) != (other["ci_low"], other["ci_high"])
    assert first["difference"] == pytest.approx(float(np.mean(b - a)))
    assert first["ci_low"] < first["difference"] < first["ci_high"]
    assert first["n_rows"] == 40 and first["seed"] == 7 and first["confidence"] == 0.95


def test_bootstrap_is_paired():
    # b beats a by exactly 1 on every row, while rows vary a lot: a paired interval is [1, 1];
    # resampling the two models independently would give a wide one.
    a = np.random.default_rng(3).normal(30, 15, size=30)
    result = stats.paired_bootstrap(a, a + 1.0, n_resamples=500)
    assert result["ci_low"] == pytest.approx(1.0) and result["ci_high"] == pytest.approx(1.0)


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        stats.paired_bootstrap([], [])
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1.0], [float("nan")])
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1.0], [2.0], confidence=1.0)


def test_mean_and_sample_std():
    values = [20.0, 22.5, 19.0, 24.0, 21.0]
    mean, std = stats.mean_and_std(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert std == pytest.approx(statistics.stdev(values))
    assert stats.mean_and_std([3.0]) == (3.0, None)
