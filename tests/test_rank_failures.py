"""Ranks that fail cleanly (issue 26, docs/reliability.md promise 16), with a real `torchrun
--nproc_per_node 2` on gloo: when one rank stops with a clean error (a full disk on rank 1 only),
every rank ends with one line naming the rank that failed and why, no rank prints a traceback,
and no `.partial` stays; a rank that waits at a collective says whom it waits for, once a
`DELTAKD_WAIT_NOTICE_SECONDS` (a minute outside the tests)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltakd_cli import distributed, faults
from deltakd_cli.option_groups import DIST_TIMEOUT_MINUTES
from deltakd_cli.train.options import DistillOptions
from tests.helpers import REPO, cache_args, flat, run_cli, torchrun

pytestmark = pytest.mark.usefixtures("one_thread")

DISTILL = ["--batch-size", 2, "--num-workers", 0, "--save-every", 2, "--max-steps", 4,
           "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("rank-failures") / "cache"
    result = run_cli(cache_args(tiny, out, "--top-k", 8, "--batch-size", 4))
    assert result.exit_code == 0, result.output
    return out


def worker_lines(stderr: str) -> dict[int, list[str]]:
    """Each rank's `error:` lines (torchrun's own summary of the failed worker left out)."""
    lines: dict[int, list[str]] = {0: [], 1: []}
    for line in stderr.splitlines():
        found = re.search(r"error: \[rank (\d)\] (.*)", line)
        if found:
            lines[int(found.group(1))].append(found.group(2))
    return lines


def assert_no_worker_traceback(stderr: str) -> None:
    """No rank prints a traceback: any "Traceback" is torchrun's report of the failed worker
    (its ChildFailedError), never a worker's own."""
    worker_errors = ("RuntimeError", "DistBackendError", "Connection closed by peer")
    assert not any(text in stderr for text in worker_errors), stderr


@pytest.mark.slow
def test_a_full_disk_on_one_rank_at_a_checkpoint_stops_every_rank_with_one_line(
    tiny, cache, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    monkeypatch.setenv(faults.FAULT_ENV, "enospc@checkpoint rng-rank1.pt")
    monkeypatch.setenv(faults.RANK_ENV, "1")
    result = torchrun(["distill", "--cache", cache, "--student", tiny.student, "--out", out,
                       *DISTILL])  # fmt: skip
    assert result.returncode != 0
    lines = worker_lines(result.stderr)
    assert len(lines[1]) == 1 and lines[1][0].startswith("cannot write"), result.stderr
    assert "no space left on the device" in lines[1][0]
    assert len(lines[0]) == 1, result.stderr
    assert lines[0][0].startswith("stopped: rank 1 failed (cannot write"), result.stderr
    assert lines[0][0].endswith("; see its line above")
    assert_no_worker_traceback(result.stderr)
    assert not list((out / "checkpoints").glob("*.partial")), list(out.rglob("*"))
    monkeypatch.delenv(faults.FAULT_ENV)
    again = torchrun(
        ["distill", "--cache", cache, "--student", tiny.student, "--out", out, *DISTILL]
    )  # fmt: skip  (the same command, as rank 1's line says)
    assert again.returncode == 0, again.stderr
    assert (out / "run.json").is_file()


@pytest.mark.slow
def test_a_full_disk_on_one_rank_in_cache_teachers_stops_every_rank_with_one_line(
    tiny, tmp_path, monkeypatch
):
    out = tmp_path / "cache"
    monkeypatch.setenv(faults.FAULT_ENV, "enospc@write shard-00001-of-00002.progress.json")
    monkeypatch.setenv(faults.RANK_ENV, "1")
    result = torchrun(cache_args(tiny, out, "--top-k", 8, "--batch-size", 4))
    assert result.returncode != 0
    lines = worker_lines(result.stderr)
    assert len(lines[1]) == 1 and "no space left on the device" in lines[1][0], result.stderr
    assert len(lines[0]) == 1, result.stderr
    assert lines[0][0].startswith("stopped: rank 1 failed ("), result.stderr
    assert_no_worker_traceback(result.stderr)
    assert not (out / "manifest.json").exists()


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker of `rank` (its child whose environment says RANK=rank)."""
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if int(fields[1]) == launcher and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def stop_rank_1_at_its_checkpoint(cache, student, out, trace, seconds, *extra):
    """Run distill under torchrun, SIGSTOP rank 1 for `seconds` (or while `seconds(launcher)`
    runs) as it reaches its part of the first checkpoint, SIGCONT it; returns (exit code,
    stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "deltakd_cli", "distill", "--cache", str(cache),
               "--student", str(student), "--out", str(out), *map(str, DISTILL),
               *map(str, extra)]  # fmt: skip
    launcher = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and launcher.poll() is None:
        if trace.exists() and "checkpoint rng-rank1.pt" in trace.read_text():
            break
        time.sleep(0.01)
    worker = _rank_pid(launcher.pid, 1)
    assert worker is not None
    os.kill(worker, signal.SIGSTOP)
    if callable(seconds):
        seconds(launcher)  # what happens meanwhile
    else:
        time.sleep(seconds)
    os.kill(worker, signal.SIGCONT)
    _, stderr = launcher.communicate(timeout=120)
    return launcher.returncode, stderr


@pytest.fixture()
def rank_1_stoppable(tmp_path, monkeypatch):
    """Rank 1 pauses 0.5 s at its part of each checkpoint (long enough to be caught there);
    waiting ranks report every second."""
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv(faults.FAULT_ENV, "pause@checkpoint rng-rank1.pt")
    monkeypatch.setenv(faults.RANK_ENV, "1")
    monkeypatch.setenv(faults.PAUSE_ENV, "0.5")
    monkeypatch.setenv(faults.TRACE_ENV, str(trace))
    monkeypatch.setenv(distributed.WAIT_NOTICE_ENV, "1")
    return trace


@pytest.mark.slow
def test_a_waiting_rank_says_whom_it_waits_for(tiny, cache, tmp_path, rank_1_stoppable):
    """Rank 1 is stopped (SIGSTOP) for 3 s as it reaches its part of the first checkpoint;
    rank 0, told to report every second, names rank 1 and the checkpoint barrier; after SIGCONT
    the run finishes."""
    out = tmp_path / "run"
    code, stderr = stop_rank_1_at_its_checkpoint(cache, tiny.student, out, rank_1_stoppable, 3)
    assert code == 0, stderr
    text = flat(stderr)
    assert "[rank 0] waiting for rank 1 at the checkpoint barrier for 1 s" in text, text
    assert "[rank 0] waiting for rank 1 at the checkpoint barrier for 2 s" in text, text
    assert (out / "run.json").is_file()


@pytest.mark.slow
def test_dist_timeout_sets_how_long_a_rank_waits(tiny, cache, tmp_path, rank_1_stoppable):
    """--dist-timeout 0.05 (3 s) and rank 1 stopped for 8 s: rank 0 stops with one line naming
    the wait; rank 1, let go, stops naming rank 0's line; no traceback, no half checkpoint."""
    out = tmp_path / "run"
    code, stderr = stop_rank_1_at_its_checkpoint(
        cache, tiny.student, out, rank_1_stoppable, 8, "--dist-timeout", 0.05
    )
    assert code != 0
    lines = worker_lines(stderr)
    assert lines[0] == [
        "stopped: waited 0.05 min for rank 1 at the checkpoint barrier (--dist-timeout)"
    ], stderr
    assert len(lines[1]) == 1 and lines[1][0].startswith("stopped: rank 0 failed"), stderr
    assert_no_worker_traceback(stderr)
    assert not list((out / "checkpoints").glob("*.partial"))


@pytest.mark.slow
def test_torchrun_stopping_its_workers_ends_each_with_one_line(
    tiny, cache, tmp_path, rank_1_stoppable
):
    """SIGTERM to the launcher while rank 0 waits for a stopped rank 1: torchrun passes it on,
    and each rank ends with one line (they died in silence), no traceback, no half checkpoint."""
    out = tmp_path / "run"

    def stop_the_launcher(launcher: subprocess.Popen) -> None:
        time.sleep(1.5)
        launcher.send_signal(signal.SIGTERM)
        time.sleep(1.5)

    code, stderr = stop_rank_1_at_its_checkpoint(
        cache, tiny.student, out, rank_1_stoppable, stop_the_launcher
    )
    assert code != 0
    lines = worker_lines(stderr)
    for rank in (0, 1):
        assert len(lines[rank]) == 1, stderr
        assert lines[rank][0].startswith("stopped: torchrun stopped this process (SIGTERM"), stderr
    assert_no_worker_traceback(stderr)
    assert not list((out / "checkpoints").glob("*.partial"))


def test_the_process_group_timeout_is_an_option_with_a_default_per_stage():
    options = DistillOptions(cache="c", student="s", out="o")
    assert options.resolved_dist_timeout() == DIST_TIMEOUT_MINUTES["distill"]
    options = DistillOptions(cache="c", student="s", out="o", dist_timeout=5)
    assert options.resolved_dist_timeout() == 5
    from deltakd_cli.cache.options import CacheOptions
    from deltakd_cli.evaluate.options import EvalOptions
    from deltakd_cli.init_student.options import InitStudentOptions

    for cls in (CacheOptions, EvalOptions, InitStudentOptions):
        assert cls.command in DIST_TIMEOUT_MINUTES
        assert "dist_timeout" in cls.__dataclass_fields__
