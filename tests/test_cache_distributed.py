"""A 2-process torchrun cache-teachers run stores the same content as one process (kill -9 and
resume: tests/test_reliability.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_rows
from helpers import cache_args, run_module, torchrun

from deltakd_cli.cache.reader import CacheReader

pytestmark = pytest.mark.slow


def shard_digests(out) -> list[tuple[str, str, int]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [(s["name"], s["sha256"], s["positions"]) for s in manifest["shards"]]


def test_two_process_torchrun_matches_one_process(tiny, tmp_path):
    # float32 storage and batch size 1 (no padding): the draws invert a running sum of the
    # proposal, so ids near a CDF boundary could flip under other numerics.
    common = ["--top-k", 8, "--batch-size", 1, "--precision", "float32", "--tail-samples", 16]
    single = tmp_path / "single"
    assert run_module(cache_args(tiny, single, *common)).returncode == 0
    double = tmp_path / "double"
    result = torchrun(cache_args(tiny, double, *common))
    assert result.returncode == 0, result.stderr[-3000:]

    one, two = CacheReader(str(single)), CacheReader(str(double))
    assert two.num_shards == 2
    assert one.manifest["counts"] == two.manifest["counts"]

    def by_index(reader):
        found = {}
        for shard in range(reader.num_shards):
            for example in reader.read_examples(shard, 0, len(reader.shard_lengths(shard))):
                found[example.example_index] = example
        return found

    first, second = by_index(one), by_index(two)
    assert sorted(first) == sorted(second) == list(range(len(make_rows(24))))
    for index, example in first.items():
        other = second[index]
        assert (example.input_ids == other.input_ids).all()
        assert (example.targets.ids == other.targets.ids).all()
        # the same draws: the generator is keyed by (seed, example, position, draw), not by rank
        assert (example.targets.sample_ids == other.targets.sample_ids).all()
        assert (example.targets.sample_counts == other.targets.sample_counts).all()
        assert example.targets.sample_counts.sum() == 16 * len(example.targets.ids)
        for name in ("tuned_logprobs", "base_logprobs", "student_logprobs", "tuned_tail",
                     "base_tail", "student_tail", "target_tail_shift", "sample_tuned_logprobs",
                     "sample_base_logprobs", "sample_student_logprobs",
                     "sample_proposal_logprobs"):  # fmt: skip
            np.testing.assert_allclose(
                getattr(example.targets, name), getattr(other.targets, name), atol=1e-6
            )
