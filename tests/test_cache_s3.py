"""Caches on a real object store: moto's S3 server on 127.0.0.1 (the `s3` fixture, conftest.py),
reached through s3fs exactly as a bucket on AWS would be. cache-teachers writes there, distill
reads there (DataLoader workers, two ranks), a kill -9 resumes to the same shards, a deleted or
changed object is named, and a dropped connection is a network error, never "damaged"."""

from __future__ import annotations

import json
import signal

import pytest
from helpers import assert_one_line_error, cache_args, run_cli, run_module, torchrun

from deltakd_cli.cache.reader import CacheReader

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CACHE_OPTIONS = ["--top-k", 8, "--batch-size", 4]
DISTILL_OPTIONS = ["--batch-size", 4, "--epochs", 1, "--objective", "delta", "--device", "cpu"]


def distill_args(cache, student, out, *extra) -> list:
    args = ["distill", "--cache", cache, "--student", student, "--out", out,
            *DISTILL_OPTIONS, *extra]  # fmt: skip
    return [str(arg) for arg in args]


@pytest.fixture(scope="module")
def s3_cache(tiny, s3):
    """A cache written by cache-teachers to s3://."""
    url = s3.url("caches/tiny")
    result = run_cli(cache_args(tiny, url, *CACHE_OPTIONS))
    assert result.exit_code == 0, result.output
    return url


def shard_digests(url: str) -> list[tuple]:
    manifest = CacheReader(url).manifest
    return [(s["name"], s["sha256"], s["positions"]) for s in manifest["shards"]]


def test_cache_teachers_writes_a_cache_to_s3_that_verifies(s3, s3_cache):
    names = s3.fs().ls(s3_cache.removeprefix("s3://"), detail=False)
    assert {name.rsplit("/", 1)[-1] for name in names} >= {"manifest.json", "shards"}
    result = run_cli(["inspect", s3_cache, "--verify"])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output


def test_distill_reads_s3_with_dataloader_workers(tiny, s3_cache, tmp_path):
    """The default --num-workers 2: each forked worker opens its own S3 filesystem (the
    parent's async client does not survive a fork)."""
    out = tmp_path / "run"
    result = run_module(distill_args(s3_cache, tiny.student, out, "--num-workers", 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "run.json").exists()
