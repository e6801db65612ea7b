"""A cache-teachers run killed (SIGKILL) at random points and resumed with the same command
ends with exactly the bytes of an uninterrupted run; a 2-process torchrun run stores the same
content as one process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
from conftest import make_rows, write_jsonl
from helpers import REPO, cache_args, run_module, torchrun

from deltakd_cli.cache import CacheReader


def shard_digests(out) -> list[tuple[str, str, int]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [(s["name"], s["sha256"], s["positions"]) for s in manifest["shards"]]


def test_killed_and_resumed_equals_uninterrupted(tiny, tmp_path):
    data = write_jsonl(tmp_path / "more.jsonl", make_rows(60, seed=5))
    common = ["--top-k", 8, "--batch-size", 2, "--data", data]
    reference = tmp_path / "reference"
    done = run_module(cache_args(tiny, reference, *common))
    assert done.returncode == 0, done.stderr

    resumed = tmp_path / "resumed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DELTAKD_FLUSH_SECONDS": "0"}
    command = [sys.executable, "-m", "deltakd_cli", *map(str, cache_args(tiny, resumed, *common))]
    rng = random.Random(7)
    kills = 0
    for _attempt in range(12):
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)  # fmt: skip
        progress = resumed / "shards" / "shard-00000-of-00001.progress.json"
        start_batches = json.loads(progress.read_text())["batches"] if progress.exists() else 0
        deadline = time.monotonic() + 120
        target = rng.randint(1, 6)  # kill after a random number of new committed batches
        while process.poll() is None and time.monotonic() < deadline:
            if progress.exists():
                try:
                    batches = json.loads(progress.read_text())["batches"]
                except (json.JSONDecodeError, FileNotFoundError):
                    batches = start_batches
                if batches - start_batches >= target:
                    time.sleep(rng.uniform(0.0, 0.3))  # land anywhere inside a batch
                    process.send_signal(signal.SIGKILL)
                    kills += 1
                    break
            time.sleep(0.01)
        process.wait()
        if process.returncode == 0:
            break
        manifest = resumed / "manifest.json"
        if manifest.exists():
            # The kill landed after the last write: the manifest is written last and atomically,
            # so it must be whole; the next launch finds the cache complete and exits 0.
            assert json.loads(manifest.read_text())["counts"]["examples"] == 60
    assert kills >= 1, "the run finished before it could be killed"
    assert process.returncode == 0, process.stderr.read()
    assert shard_digests(resumed) == shard_digests(reference)


def test_two_process_torchrun_matches_one_process(tiny, tmp_path):
    common = ["--top-k", 8, "--batch-size", 1, "--precision", "float32"]
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
        assert (example.ids == other.ids).all()
        for name in ("tuned_logprobs", "base_logprobs", "student_logprobs", "tuned_tail",
                     "base_tail", "student_tail", "target_tail_shift"):  # fmt: skip
            np.testing.assert_allclose(getattr(example, name), getattr(other, name), atol=1e-6)
