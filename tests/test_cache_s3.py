"""Caches on a real object store: moto's S3 server on 127.0.0.1 (the `s3` fixture, conftest.py),
reached through s3fs exactly as a bucket on AWS would be. cache-teachers writes there, distill
reads there (DataLoader workers, two ranks), a kill -9 resumes to the same shards, a deleted or
changed object is named, and a dropped connection is a network error, never "damaged"."""

from __future__ import annotations

import signal

import pytest
from helpers import assert_one_line_error, cache_args, run_cli, run_module, torchrun

from deltakd_cli.cache.reader import CacheReader
from deltakd_cli.errors import DeltakdError

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


def test_distill_reads_s3_with_two_ranks(tiny, s3_cache, tmp_path):
    out = tmp_path / "run"
    result = torchrun(distill_args(s3_cache, tiny.student, out, "--num-workers", 1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "run.json").exists()


def copy_cache(s3, source: str, name: str) -> str:
    """A copy of a cache on the same server (the module's cache stays whole)."""
    target = s3.url(name)
    s3.fs().copy(source.removeprefix("s3://"), target.removeprefix("s3://"), recursive=True)
    return target


def chunk_object(url: str, array: str) -> str:
    return f"{url.removeprefix('s3://')}/shards/shard-00000-of-00001.zarr/{array}/c/0/0"


def test_a_deleted_object_is_named(tiny, s3, s3_cache, tmp_path):
    url = copy_cache(s3, s3_cache, "deleted")
    s3.fs().rm(chunk_object(url, "tuned_logprobs"))
    result = run_cli(["inspect", url, "--verify"])
    assert_one_line_error(result, "shard-00000-of-00001", "tuned_logprobs has 0 of its 1 chunk")
    result = run_cli(distill_args(url, tiny.student, tmp_path / "run", "--num-workers", 0))
    assert_one_line_error(result, "tuned_logprobs has 0 of its 1 chunk")


def test_a_changed_object_is_named(tiny, s3, s3_cache, tmp_path):
    url = copy_cache(s3, s3_cache, "changed")
    fs, key = s3.fs(), chunk_object(url, "base_logprobs")
    fs.pipe(key, fs.cat(key)[:-3] + b"xyz")
    result = run_cli(["inspect", url, "--verify"])
    assert_one_line_error(result, "damaged shards", "shard-00000-of-00001")


def test_a_chunk_that_does_not_decode_in_a_worker_is_one_line(tiny, s3, s3_cache, tmp_path):
    """Read by a DataLoader worker (--no-verify-cache skips the checksums): the worker's error
    reaches the user as its own one line, and it says damaged because the bytes are."""
    url = copy_cache(s3, s3_cache, "undecodable")
    fs, key = s3.fs(), chunk_object(url, "base_logprobs")
    fs.pipe(key, fs.cat(key)[:8])  # a blosc header cut short: no codec decodes it
    args = distill_args(url, tiny.student, tmp_path / "run", "--num-workers", 2)
    result = run_module([*args, "--no-verify-cache"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "does not decode" in errors[0] and "DataLoader" not in errors[0]


def test_kill_9_while_writing_to_s3_then_resume_gives_the_same_shards(tiny, s3, s3_cache, tmp_path):
    url = s3.url("killed")
    args = [str(arg) for arg in cache_args(tiny, url, *CACHE_OPTIONS)]
    trace = tmp_path / "trace"
    env = {"DELTAKD_FLUSH_SECONDS": "0"}
    traced = run_module(args, {**env, "DELTAKD_FAULT_TRACE": str(trace)})
    assert traced.returncode == 0, traced.stderr[-3000:]
    points = len(trace.read_text().splitlines())
    s3.fs().rm(url.removeprefix("s3://"), recursive=True)
    kills = 0
    for fraction in (0.2, 0.45, 0.7, 0.95):  # a chain of kills, each resumed by the next run
        result = run_module(
            args, {**env, "DELTAKD_FAULT": f"kill@{max(1, int(fraction * points))}"}
        )
        if result.returncode == -signal.SIGKILL:
            kills += 1
        else:
            assert result.returncode == 0, result.stderr[-3000:]
    assert kills >= 2
    result = run_module(args, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert shard_digests(url) == shard_digests(s3_cache)
    assert run_cli(["inspect", url, "--verify"]).exit_code == 0


def test_a_dropped_connection_is_a_network_error_with_retries(
    s3, s3_cache, tmp_path, monkeypatch, capsys
):
    """The server goes away mid-read: the reader retries with backoff, then says it is a network
    or storage error and that the cache is not known to be damaged; never "rebuild"."""
    import fsspec.config
    from conftest import S3Server

    from deltakd_cli.cache import reader as cache_reader

    local = tmp_path / "copy"
    s3.fs().get(s3_cache.removeprefix("s3://"), str(local), recursive=True)
    other = S3Server("dropped")
    try:
        other.fs().put(str(local), "dropped/cache", recursive=True)
        monkeypatch.setitem(fsspec.config.conf, "s3", other.options())
        monkeypatch.setattr(cache_reader, "READ_BACKOFF_SECONDS", 0.1, raising=False)
        reader = CacheReader("s3://dropped/cache")
        reader.check_structure()
        assert len(reader.read_examples(0, 0, 2)) == 2
    finally:
        other.stop()
    capsys.readouterr()
    with pytest.raises(DeltakdError) as raised:
        reader.read_examples(0, 2, 4)
    message = str(raised.value)
    assert "network or storage error" in message and "not known to be damaged" in message
    assert "rebuild" not in message
    retries = capsys.readouterr().err.count("retrying in")
    assert retries == cache_reader.READ_ATTEMPTS - 1
