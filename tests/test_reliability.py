"""What deltakd promises when things go wrong (docs/reliability.md), shown on the tiny world:

- kill -9 at seeded random points of cache-teachers and distill, each followed by a resume,
  ends byte-identical to an uninterrupted run;
- a full disk at seeded random points never hangs and never leaves a complete-looking output,
  and the next run finishes it;
- the ten failure cases of issue 9, one test each: a writer that dies, two runs into one output,
  outputs over inputs, partly random models, resume over a rebuilt cache, code in a checkpoint,
  an edited manifest, a mistyped local path, raw tracebacks, Ctrl-C.

Faults are injected at the named points of `deltakd_cli.faults` (DELTAKD_FAULT=kill@N etc.):
a traced reference run says how many points there are and where each one is."""

from __future__ import annotations

import faulthandler
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_rows, write_jsonl
from helpers import REPO, assert_one_line_error, cache_args, flat, run_cli
from safetensors.torch import load_file, save_file
from zygote import Zygote

from deltakd_cli import faults, outputs
from deltakd_cli.cache import writer as cache_writer
from deltakd_cli.cache.manifest import manifest_checksum
from deltakd_cli.cache.reader import CacheReader

pytestmark = pytest.mark.usefixtures("one_thread")

CACHE_OPTIONS = ["--top-k", 8, "--batch-size", 2, "--tail-samples", 8]  # the sampled tail too
DISTILL_OPTIONS = ["--batch-size", 4, "--num-workers", 0, "--save-every", 2, "--lr", "5e-3",
                   "--objective", "delta", "--sft-weight", "0.2", "--device", "cpu"]  # fmt: skip


def distill_args(cache, student, out, *extra) -> list:
    return ["distill", "--cache", cache, "--student", student, "--out", out,
            *DISTILL_OPTIONS, *extra]  # fmt: skip


def traced(args: list, trace: Path, monkeypatch) -> list[str]:
    """Run the CLI in-process with every fault point recorded; returns the point names."""
    monkeypatch.setenv(faults.TRACE_ENV, str(trace))
    faults.reset()
    result = run_cli(args)
    monkeypatch.delenv(faults.TRACE_ENV)
    assert result.exit_code == 0, result.output
    return trace.read_text().splitlines()


def point_index(points: list[str], name: str, occurrence: int = 1) -> int:
    """The 1-based index of the `occurrence`-th point called `name`."""
    seen = 0
    for index, point in enumerate(points, start=1):
        if point == name:
            seen += 1
            if seen == occurrence:
                return index
    raise AssertionError(f"no point {name!r} #{occurrence} in {sorted(set(points))}")


def digests(out: Path) -> list:
    manifest = json.loads((out / "manifest.json").read_text())
    return [(s["name"], s["sha256"], s["positions"]) for s in manifest["shards"]]


def weights(out: Path) -> dict:
    return load_file(out / "model.safetensors")


def metric(out: Path, name: str) -> list:
    return [json.loads(line)[name] for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory):
    """Reference outputs made without faults, and their traces."""
    root = tmp_path_factory.mktemp("reliability")
    data = write_jsonl(root / "rows.jsonl", make_rows(24, seed=5))
    mp = pytest.MonkeyPatch()
    mp.setattr(cache_writer, "FLUSH_SECONDS", 0.0)  # every batch is flushed: more points to hit
    try:
        cache = root / "cache"
        cache_points = traced(
            cache_args(tiny, cache, *CACHE_OPTIONS, "--data", data), root / "cache.trace", mp
        )
        run = root / "run"
        distill_points = traced(
            distill_args(cache, tiny.student, run, "--epochs", 2), root / "run.trace", mp
        )
    finally:
        mp.undo()
    return {
        "root": root,
        "data": data,
        "cache": cache,
        "cache_points": cache_points,
        "run": run,
        "distill_points": distill_points,
    }


@pytest.fixture()
def watchdog():
    """A hang fails the suite (with every thread's stack) instead of stalling it."""
    faulthandler.dump_traceback_later(600, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    """Real processes for the kill tests, forked from one that imported deltakd once."""
    started = Zygote(tmp_path_factory.mktemp("launches"), {"HF_HUB_OFFLINE": "1"})
    yield started
    started.close()


def launch(zygote: Zygote, args: list, fault: str | None = None, timeout: int = 180):
    env = {"DELTAKD_FLUSH_SECONDS": "0"}
    if fault:
        env[faults.FAULT_ENV] = fault
    return zygote.run(args, env, timeout)


# ----------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_cache_teachers_killed_at_20_points_resumes_byte_identical(tiny, world, zygote, tmp_path):
    out = tmp_path / "cache"
    args = cache_args(tiny, out, *CACHE_OPTIONS, "--data", world["data"])
    total = len(world["cache_points"])
    rng = random.Random(11)
    kills = finished = 0
    while kills < 20:
        result = launch(zygote, args, fault=f"kill@{rng.randint(1, total)}")
        if result.returncode == -signal.SIGKILL:
            kills += 1
            if (out / "manifest.json").exists():  # killed after the manifest: it is whole
                assert CacheReader(str(out)).verify() == []
            continue
        assert result.returncode == 0, result.stderr
        assert digests(out) == digests(world["cache"])
        finished += 1
        shutil.rmtree(out)  # start another chain of kills
    result = launch(zygote, args)
    assert result.returncode == 0, result.stderr
    assert digests(out) == digests(world["cache"])


@pytest.mark.slow
def test_distill_killed_at_20_points_resumes_byte_identical(tiny, world, zygote, tmp_path):
    out = tmp_path / "run"
    total = len(world["distill_points"])
    reference = weights(world["run"])
    rng = random.Random(12)

    def args() -> list:
        resume = ["--resume"] if list((out / "checkpoints").glob("step-*")) else []
        return distill_args(world["cache"], tiny.student, out, "--epochs", 2, *resume)

    kills = 0
    while kills < 20:
        result = launch(zygote, args(), fault=f"kill@{rng.randint(1, total)}")
        if result.returncode == -signal.SIGKILL:
            kills += 1
            if (out / "run.json").exists():  # killed after the record: the model is whole
                assert same_weights(weights(out), reference)
            continue
        assert result.returncode == 0, result.stderr
        assert same_weights(weights(out), reference)
        shutil.rmtree(out)
    result = launch(zygote, args())
    assert result.returncode == 0, result.stderr
    assert same_weights(weights(out), reference)
    steps = metric(out, "step")
    assert steps == list(range(1, len(steps) + 1))
    assert metric(out, "loss") == metric(world["run"], "loss")


# ----------------------------------------------------------------------------- full disk


def run_with_fault(args: list, fault: str, monkeypatch):
    monkeypatch.setenv(faults.FAULT_ENV, fault)
    faults.reset()
    try:
        return run_cli(args)
    finally:
        monkeypatch.delenv(faults.FAULT_ENV)


@pytest.mark.slow
def test_cache_teachers_full_disk_at_20_points(tiny, world, tmp_path, monkeypatch, watchdog):
    monkeypatch.setattr(cache_writer, "FLUSH_SECONDS", 0.0)
    out = tmp_path / "cache"
    args = cache_args(tiny, out, *CACHE_OPTIONS, "--data", world["data"])
    points = world["cache_points"]
    for index in sorted(random.Random(13).sample(range(1, len(points) + 1), 20)):
        result = run_with_fault(args, f"enospc@{index}", monkeypatch)
        if result.exit_code == 0:  # the point fell after this run's last write: it is complete
            assert digests(out) == digests(world["cache"])
            shutil.rmtree(out)
            continue
        assert_one_line_error(result, "no space left on the device")
        if (out / "manifest.json").exists():
            assert CacheReader(str(out)).verify() == []
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert digests(out) == digests(world["cache"])


@pytest.mark.slow
def test_distill_full_disk_at_20_points(tiny, world, tmp_path, monkeypatch, watchdog):
    out = tmp_path / "run"
    points = world["distill_points"]
    reference = weights(world["run"])

    def args() -> list:
        resume = ["--resume"] if list((out / "checkpoints").glob("step-*")) else []
        return distill_args(world["cache"], tiny.student, out, "--epochs", 2, *resume)

    for index in sorted(random.Random(14).sample(range(1, len(points) + 1), 20)):
        result = run_with_fault(args(), f"enospc@{index}", monkeypatch)
        if result.exit_code == 0:
            assert same_weights(weights(out), reference)
            shutil.rmtree(out)
            continue
        assert_one_line_error(result, "no space left on the device")
        assert not (out / "run.json").exists()  # nothing looks finished
    result = run_cli(args())
    assert result.exit_code == 0, result.output
    assert same_weights(weights(out), reference)


# ----------------------------------------------------------------------------- 1: a dying writer


@pytest.mark.slow
def test_a_writer_that_fails_stops_the_run_instead_of_hanging(tiny, world, zygote, tmp_path):
    """Case 1: the shard writer thread dies on its first write while the compute side keeps
    queueing batches (60 batches, a queue of 4): the run must stop with one line, not block."""
    data = write_jsonl(tmp_path / "many.jsonl", make_rows(60, seed=8))
    out = tmp_path / "cache"
    args = cache_args(tiny, out, "--top-k", 8, "--batch-size", 1, "--data", data)
    first_append = point_index(world["cache_points"], "append input_ids")
    result = launch(zygote, args, fault=f"enospc@{first_append}", timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "no space left on the device" in flat(result.stderr)
    assert "shard-00000-of-00001.zarr" in flat(result.stderr)
    assert not (out / "manifest.json").exists()


@pytest.mark.slow
def test_a_real_full_disk_on_a_small_tmpfs(tiny, zygote, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC tests cover it")
    try:
        data = write_jsonl(tmp_path / "many.jsonl", make_rows(400, seed=9))
        out = mount / "cache"
        result = launch(zygote, cache_args(tiny, out, "--top-k", 64, "--data", data), timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert "no space left on the device" in flat(result.stderr)
        assert str(out) in flat(result.stderr)
        assert not (out / "manifest.json").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ----------------------------------------------------------------------------- a real full disk


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A real 64 MiB tmpfs, mounted for these tests (skipped, with the reason, where the suite
    may not mount one: the injected faults above and below cover the same writes)."""
    mount = tmp_path_factory.mktemp("small-disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        reason = (mounted.stderr.strip() or f"exit {mounted.returncode}").splitlines()[0]
        pytest.skip(f"cannot mount a tmpfs here ({reason}); the injected faults cover it")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture()
def disk(small_disk, monkeypatch):
    """The small disk, empty; fill@N fills it (faults.fill)."""
    for entry in small_disk.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    monkeypatch.setenv(faults.FILL_ENV, str(small_disk))
    return small_disk


def fill_at(args: list, out: Path, name: str, monkeypatch, occurrence: int = 1):
    """Run `args` (writing `out`, on the small disk) once traced, then again into an empty
    `out`, the disk filled for real just before the point `name`: the write that follows meets a
    full disk with its library's own error."""
    trace = out.parent / "trace.txt"
    points = traced(args, trace, monkeypatch)
    trace.unlink()
    shutil.rmtree(out) if out.is_dir() else out.unlink()
    if callable(name):
        name = next(point for point in points if name(point))
    fault = f"fill@{point_index(points, name, occurrence)}"
    return run_with_fault(args, fault, monkeypatch), name


def assert_full_disk_line(result, path: Path) -> None:
    assert_one_line_error(result, f"cannot write {path}:", "no space left on the device", " free")


def free_the_disk(disk: Path) -> None:
    (disk / faults.FILLER).unlink()


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, named, exception",
    [("checkpoint model.pt", "checkpoints/step-4", "torch.save's RuntimeError"),
     ("export save", "", "safetensors' SafetensorError"),
     ("write run.json", "run.json", "OSError")],
)  # fmt: skip
def test_distill_on_a_real_full_disk(tiny, world, disk, monkeypatch, point, named, exception):
    out = disk / "run"
    args = distill_args(world["cache"], tiny.student, out, "--epochs", 2)
    occurrence = 2 if point == "checkpoint model.pt" else 1  # step-2 is there to resume from
    result, _ = fill_at(args, out, point, monkeypatch, occurrence)
    assert_full_disk_line(result, out / named if named else out)  # not {exception}'s traceback
    assert not (out / "checkpoints" / "step-4").exists() or point != "checkpoint model.pt"
    assert not (out / "run.json").exists() and not list(out.rglob("*.partial"))
    if point != "write run.json":  # the model is exported before its record
        assert not (out / "config.json").exists()
    free_the_disk(disk)
    result = run_cli([*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert same_weights(weights(out), weights(world["run"]))  # as the uninterrupted run


@pytest.mark.slow
@pytest.mark.parametrize("point", ["append tuned_logprobs", "write settings.json",
                                   "write manifest.json"])  # fmt: skip
def test_cache_teachers_on_a_real_full_disk(tiny, world, disk, monkeypatch, point):
    monkeypatch.setattr(cache_writer, "FLUSH_SECONDS", 0.0)  # as in the traced reference
    out = disk / "cache"
    args = cache_args(tiny, out, *CACHE_OPTIONS, "--data", world["data"])
    result, _ = fill_at(args, out, point, monkeypatch)
    assert_one_line_error(result, str(out), "no space left on the device", " free")
    assert not (out / "manifest.json").exists()
    free_the_disk(disk)
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert digests(out) == digests(world["cache"])


@pytest.mark.slow
def test_eval_predictions_on_a_real_full_disk(tiny, disk, monkeypatch):
    report = disk / "eval" / "REPORT.json"
    args = ["eval", "--model", tiny.student, "--data", tiny.test, "--protocol", "greedy",
            "--max-new-tokens", 4, "--out", report, "--device", "cpu"]  # fmt: skip
    result, generations = fill_at(args, report.parent, lambda p: "generations" in p, monkeypatch)
    assert_full_disk_line(result, report.parent / generations.removeprefix("write "))
    assert not report.exists() and not list(report.parent.glob("*.partial"))
    free_the_disk(disk)
    assert run_cli(args).exit_code == 0 and report.exists()


@pytest.mark.slow
def test_report_on_a_real_full_disk(world, disk, monkeypatch):
    out = disk / "report"
    args = ["report", world["run"], "--out", out]
    result, figure = fill_at(args, out, lambda p: p.endswith(".png"), monkeypatch)
    assert_full_disk_line(result, out / figure.removeprefix("write "))
    assert not (out / "index.html").exists() and not list(out.glob("*.partial"))
    free_the_disk(disk)
    assert run_cli(args).exit_code == 0 and (out / "index.html").exists()


TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.mark.slow
def test_the_libraries_own_write_errors_are_one_line(tiny, world, tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: the exact exceptions torch.save and safetensors raise on a
    full disk (a RuntimeError without errno, a SafetensorError), raised at their real call sites."""
    from safetensors import SafetensorError
    from transformers import modeling_utils

    from deltakd_cli.train import checkpoint

    def short_write(value, path):
        Path(path).write_bytes(b"half")  # what torch leaves behind
        raise RuntimeError(TORCH_SHORT_WRITE)

    def no_space(*args, **kwargs):
        raise SafetensorError(SAFETENSORS_FULL)

    out = tmp_path / "run"
    args = distill_args(world["cache"], tiny.student, out, "--epochs", 2)
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.torch, "save", short_write)
        result = run_cli(args)
    # torch says nothing of why; with plenty free here it is an I/O error, not a full disk
    assert_one_line_error(result, f"cannot write {out / 'checkpoints' / 'step-2'}:", "cut short")
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    shutil.rmtree(out)
    with monkeypatch.context() as patch:
        patch.setattr(modeling_utils, "safe_save_file", no_space)
        result = run_cli(args)
    assert_one_line_error(result, f"cannot write {out}:", "no space left on the device", " free")
    assert not (out / "config.json").exists() and not (out / ".export.partial").exists()


# ----------------------------------------------------------------------------- 2: two writers


def wait_for_lock(directory: Path, process: subprocess.Popen) -> None:
    lock = directory / outputs.LOCK
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads(lock.read_text())["pid"] == process.pid:
                return
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{process.args} did not take its lock: {process.communicate()}")


@pytest.mark.slow
def test_two_runs_into_one_output_the_second_is_refused(tiny, world, tmp_path):
    """Case 2, with two real processes per command: the first holds the output (paused at a
    write), the second is refused with the holder's pid; the first then finishes normally."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cases = [
        (cache_args(tiny, tmp_path / "cache", *CACHE_OPTIONS, "--data", world["data"]),
         tmp_path / "cache", point_index(world["cache_points"], "append input_ids"),
         "manifest.json"),
        (distill_args(world["cache"], tiny.student, tmp_path / "run", "--epochs", 2),
         tmp_path / "run", point_index(world["distill_points"], "metrics"), "run.json"),
    ]  # fmt: skip
    for args, out, pause_at, complete_file in cases:
        command = [sys.executable, "-m", "deltakd_cli", *map(str, args)]
        first = subprocess.Popen(
            command, cwd=REPO, env={**env, faults.FAULT_ENV: f"pause@{pause_at}"},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_for_lock(out, first)
            second = run_cli(args)
            assert_one_line_error(second, "in use by another deltakd run", f"pid {first.pid}")
        finally:
            first.kill()
            first.wait()
        assert not (out / complete_file).exists()


# ----------------------------------------------------------------------------- 3: inputs


def test_outputs_never_overwrite_inputs(tiny, world, tmp_path):
    data_copy = tmp_path / "test.jsonl"
    shutil.copy(tiny.test, data_copy)
    before = data_copy.read_bytes()
    result = run_cli(["eval", "--model", tiny.student, "--data", data_copy, "--out", data_copy,
                      "--protocol", "greedy", "--device", "cpu"])  # fmt: skip
    assert_one_line_error(result, "same path as --data")
    assert data_copy.read_bytes() == before

    model = tmp_path / "model"
    shutil.copytree(tiny.student, model)
    model_bytes = (model / "model.safetensors").read_bytes()
    result = run_cli(["finetune", "--model", model, "--data", tiny.train, "--out", model,
                      "--max-steps", 1, "--device", "cpu"])  # fmt: skip
    assert_one_line_error(result, "same path as --model")
    result = run_cli(["finetune", "--model", model, "--data", tiny.train, "--out", model / "x",
                      "--max-steps", 1, "--device", "cpu"])  # fmt: skip
    assert_one_line_error(result, "inside --model")
    assert (model / "model.safetensors").read_bytes() == model_bytes

    foreign = tmp_path / "someone-elses"
    foreign.mkdir()
    (foreign / "config.json").write_text("theirs")
    args = distill_args(world["cache"], tiny.student, foreign, "--max-steps", 2)
    for overwrite in ([], ["--overwrite"]):
        result = run_cli([*args, *overwrite])
        assert_one_line_error(result, "did not create (config.json)", "not taken for the training")
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json"]
    # A run's own folder: the same run again is skipped (as every stage skips complete,
    # identical work); a finished run of other settings is not replaced without --overwrite,
    # and is with it.
    own = tmp_path / "own"
    args = distill_args(world["cache"], tiny.student, own, "--max-steps", 2)
    assert run_cli(args).exit_code == 0
    record = (own / "run.json").read_bytes()
    again = run_cli(args)
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output
    assert (own / "run.json").read_bytes() == record
    args = distill_args(world["cache"], tiny.student, own, "--max-steps", 2, "--seed", 7)
    assert_one_line_error(run_cli(args), "already holds a finished run", "--overwrite")
    assert run_cli([*args, "--overwrite"]).exit_code == 0
    assert (own / "run.json").is_file()


# ----------------------------------------------------------------------------- 4: broken models


def test_a_checkpoint_missing_weights_is_refused_everywhere(tiny, world, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny.teacher_base, broken)
    state = load_file(broken / "model.safetensors")
    del state["lm_head.weight"]
    for key in [k for k in state if k.startswith("model.layers.1.")]:
        del state[key]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    result = run_cli(["cache-teachers", "--teacher-base", broken, "--teacher-tuned",
                      tiny.teacher_tuned, "--data", tiny.train, "--out", tmp_path / "c",
                      "--top-k", 4, "--device", "cpu"])  # fmt: skip
    assert_one_line_error(result, "missing (lm_head.weight", "partly random model")
    assert not (tmp_path / "c" / "manifest.json").exists()
    result = run_cli(["eval", "--model", broken, "--data", tiny.test, "--protocol", "greedy",
                      "--device", "cpu"])  # fmt: skip
    assert_one_line_error(result, "weights do not match its architecture")


# ----------------------------------------------------------------------------- 5 and 6: resume


def checkpointed_run(tiny, world, out, monkeypatch) -> None:
    """A distill run stopped by a full disk at its export: its checkpoints stay."""
    args = distill_args(world["cache"], tiny.student, out, "--epochs", 2)
    index = point_index(world["distill_points"], "export save")
    result = run_with_fault(args, f"enospc@{index}", monkeypatch)
    assert_one_line_error(result, "no space left")
    assert list((out / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_resume_over_a_rebuilt_cache_is_refused(tiny, world, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    out = tmp_path / "run"
    args = distill_args(cache, tiny.student, out, "--epochs", 2)
    index = point_index(world["distill_points"], "export save")
    assert_one_line_error(run_with_fault(args, f"enospc@{index}", monkeypatch), "no space left")
    other_rows = write_jsonl(tmp_path / "other.jsonl", make_rows(24, seed=77))
    rebuilt = run_cli(cache_args(tiny, cache, *CACHE_OPTIONS, "--data", other_rows, "--overwrite"))
    assert rebuilt.exit_code == 0, rebuilt.output
    result = run_cli([*args, "--resume"])
    assert_one_line_error(result, f"the cache {cache} is not the one", "rebuilt")


@pytest.mark.slow
def test_resume_with_a_moved_cache_works_and_is_recorded(tiny, world, tmp_path, monkeypatch):
    cache, moved, out = tmp_path / "cache", tmp_path / "elsewhere" / "cache", tmp_path / "run"
    shutil.copytree(world["cache"], cache)
    args = distill_args(cache, tiny.student, out, "--epochs", 2)
    index = point_index(world["distill_points"], "checkpoint model.pt", occurrence=2)
    assert_one_line_error(run_with_fault(args, f"enospc@{index}", monkeypatch), "no space left")
    moved.parent.mkdir()
    shutil.move(cache, moved)
    result = run_cli([*distill_args(moved, tiny.student, out, "--epochs", 2), "--resume"])
    assert result.exit_code == 0, result.output
    assert same_weights(weights(out), weights(world["run"]))  # as the uninterrupted run
    record = json.loads((out / "run.json").read_text())
    assert record["resolved"]["resumed"]["cache_moved"] == [str(cache), str(moved)]


def test_finetune_resume_over_changed_data_is_refused(tiny, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(16, seed=3))
    out = tmp_path / "tuned"
    args = ["finetune", "--model", tiny.student, "--data", data, "--out", out, "--batch-size", 4,
            "--max-steps", 4, "--save-every", 2, "--device", "cpu"]  # fmt: skip
    points = traced([*args[:6], tmp_path / "traced", *args[7:]], tmp_path / "trace", monkeypatch)
    index = point_index(points, "export save")
    assert_one_line_error(run_with_fault(args, f"enospc@{index}", monkeypatch), "no space left")
    assert list((out / "checkpoints").glob("step-*"))
    write_jsonl(data, make_rows(16, seed=4))
    assert_one_line_error(run_cli([*args, "--resume"]), f"the data file {data} changed")


class Payload:
    """Unpickling this runs code: it must never happen on --resume."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_checkpoint_that_would_run_code_is_refused(tiny, world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    checkpointed_run(tiny, world, out, monkeypatch)
    step = sorted((out / "checkpoints").glob("step-*"))[-1]
    marker = tmp_path / "pwned"
    for name in ("optimizer.pt", "rng-rank0.pt"):
        original = (step / name).read_bytes()
        with open(step / name, "wb") as handle:
            pickle.dump({"state": Payload(marker)}, handle, protocol=2)
        args = distill_args(world["cache"], tiny.student, out, "--epochs", 2, "--resume")
        assert_one_line_error(run_cli(args), "not a plain-data checkpoint", "nothing in it was run")
        assert not marker.exists()
        (step / name).write_bytes(original)


# ----------------------------------------------------------------------------- 7: the manifest


def edited_cache(world, tmp_path, edit) -> Path:
    cache = tmp_path / "edited"
    shutil.copytree(world["cache"], cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    edit(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return cache


@pytest.mark.parametrize("field, value", [("top_k", 4), ("alpha", 2.0)])
def test_an_edited_manifest_fails_verification(tiny, world, tmp_path, field, value):
    cache = edited_cache(world, tmp_path, lambda manifest: manifest.update({field: value}))
    assert_one_line_error(run_cli(["inspect", cache, "--verify"]), "changed after it was written")
    args = distill_args(cache, tiny.student, tmp_path / "run", "--no-verify-cache")
    assert_one_line_error(run_cli(args), "changed after it was written")


def test_a_shard_name_outside_the_cache_is_refused(world, tmp_path):
    def escape(manifest):
        manifest["shards"][0]["name"] = "../../../outside/x"
        manifest["manifest_sha256"] = manifest_checksum(manifest)

    cache = edited_cache(world, tmp_path, escape)
    assert_one_line_error(run_cli(["inspect", cache]), "'../../../outside/x' is not a shard name")


def test_no_verify_cache_still_checks_the_structure(tiny, world, tmp_path):
    cache = tmp_path / "damaged"
    shutil.copytree(world["cache"], cache)
    chunk = next((cache / "shards").glob("*.zarr/tuned_logprobs/c/*/*"))
    chunk.unlink()
    args = distill_args(cache, tiny.student, tmp_path / "run", "--no-verify-cache")
    assert_one_line_error(run_cli(args), "tuned_logprobs has", "chunk files")
    # a shard whose arrays disagree with the manifest (as two writers left it)
    cache2 = tmp_path / "longer"
    shutil.copytree(world["cache"], cache2)
    import zarr

    group = zarr.open_group(str(next((cache2 / "shards").glob("*.zarr"))), mode="r+")
    group["ids"].resize((group["ids"].shape[0] + 5, group["ids"].shape[1]))
    args = distill_args(cache2, tiny.student, tmp_path / "run2", "--no-verify-cache")
    assert_one_line_error(run_cli(args), "ids has shape", "rebuild the cache")


# ----------------------------------------------------------------------------- 8: paths


def test_a_mistyped_local_path_never_goes_to_the_hub(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("m").mkdir()
    shutil.copytree(tiny.teacher_tuned, "m/teacher-tuned")
    result = run_cli(["cache-teachers", "--teacher-base", tiny.teacher_base, "--teacher-tuned",
                      "m/teacher-tuend", "--data", tiny.train, "--out", "c",
                      "--device", "cpu"])  # fmt: skip
    assert_one_line_error(
        result, "model not found: m/teacher-tuend", "Hub is not asked", "m/teacher-tuned?"
    )


def test_file_urls_are_local_paths(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "by-url"
    result = run_cli(cache_args(tiny, f"file://{out}", "--top-k", 4))
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file()
    assert not Path("file:").exists()


# ----------------------------------------------------------------------------- 9: one line


@pytest.mark.slow
def test_full_disk_at_each_kind_of_write_is_one_line(tiny, world, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_writer, "FLUSH_SECONDS", 0.0)  # as in the traced reference
    cache_args_ = cache_args(tiny, tmp_path / "c", *CACHE_OPTIONS, "--data", world["data"])
    for name in ("write settings.json", "write manifest.json"):
        index = point_index(world["cache_points"], name)
        result = run_with_fault(cache_args_, f"enospc@{index}", monkeypatch)
        assert_one_line_error(result, "no space left on the device", str(tmp_path / "c"))
        assert not (tmp_path / "c" / "manifest.json").exists()
    train_args = distill_args(world["cache"], tiny.student, tmp_path / "r", "--epochs", 2)
    for name in ("checkpoint model.pt", "export save", "write run.json"):
        index = point_index(world["distill_points"], name)
        shutil.rmtree(tmp_path / "r", ignore_errors=True)
        result = run_with_fault(train_args, f"enospc@{index}", monkeypatch)
        assert_one_line_error(result, "no space left on the device", str(tmp_path / "r"))
        assert not (tmp_path / "r" / "run.json").exists()
    report = tmp_path / "report.json"
    eval_args = ["eval", "--model", tiny.student, "--data", tiny.test, "--protocol", "greedy",
                 "--max-new-tokens", 4, "--out", report, "--device", "cpu"]  # fmt: skip
    for index in (2, 4):  # the generations file, then the report itself
        result = run_with_fault(eval_args, f"enospc@{index}", monkeypatch)
        assert_one_line_error(result, "no space left on the device")
        assert not report.exists()


def test_an_out_that_is_a_file_is_one_line(tiny, world, tmp_path):
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    assert_one_line_error(run_cli(cache_args(tiny, existing)), "is not a directory")
    args = distill_args(world["cache"], tiny.student, existing)
    assert_one_line_error(run_cli(args), "is not a directory")
    result = run_cli(["eval", "--model", tiny.student, "--data", tiny.test, "--out", existing,
                      "--protocol", "greedy", "--device", "cpu"])  # fmt: skip
    assert_one_line_error(result, "already exists", "--overwrite")
    assert existing.read_text() == "x"


def test_a_leftover_partial_record_does_not_block_later_runs(tiny, tmp_path):
    out = tmp_path / "c"
    result = run_cli(cache_args(tiny, out, "--top-k", 4))
    assert result.exit_code == 0, result.output
    (out / "settings.json.partial").write_text('{"settin')  # a write cut by a kill
    result = run_cli(cache_args(tiny, out, "--top-k", 4))
    assert result.exit_code == 0, result.output
    result = run_cli(cache_args(tiny, out, "--top-k", 8, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert not (out / "settings.json.partial").exists()


# ----------------------------------------------------------------------------- 10: smaller


def _sigint_as_in_a_terminal() -> None:
    """A suite started in the background (`cmd &`, nohup, some CI runners) runs with SIGINT
    ignored, and a child inherits that; Ctrl-C must reach the child as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(args: list, pause_at: int, trace: Path) -> subprocess.CompletedProcess:
    """Start the command, wait until it pauses at the `pause_at`-th fault point (its trace
    then has that many lines), and press Ctrl-C (SIGINT)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "DELTAKD_FLUSH_SECONDS": "0", faults.FAULT_ENV: f"pause@{pause_at}",
           faults.TRACE_ENV: str(trace)}  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "deltakd_cli", *map(str, args)], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=_sigint_as_in_a_terminal)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if trace.exists() and len(trace.read_text().splitlines()) >= pause_at:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # inside the pause
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_ctrl_c_exits_130_with_a_hint_that_works(tiny, world, zygote, tmp_path):
    out = tmp_path / "run"
    args = distill_args(world["cache"], tiny.student, out, "--epochs", 2, "--num-workers", 2)
    pause_at = point_index(world["distill_points"], "metrics", occurrence=5)  # after step-4
    stopped = interrupt(args, pause_at, tmp_path / "distill.trace")
    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted:")
    hint = flat(stopped.stderr)
    assert "rerun the same command with --resume" in hint and "step-4" in hint
    resumed = launch(zygote, [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(weights(out), weights(world["run"]))

    cache = tmp_path / "cache"
    cache_run = cache_args(tiny, cache, *CACHE_OPTIONS, "--data", world["data"])
    pause_at = point_index(world["cache_points"], "append input_ids", 3)
    stopped = interrupt(cache_run, pause_at, tmp_path / "cache.trace")
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
    assert "rerun the same command to resume" in flat(stopped.stderr)
    assert launch(zygote, cache_run).returncode == 0
    assert digests(cache) == digests(world["cache"])


def test_truncation_is_reported_and_max_length_checked(tiny, tmp_path):
    result = run_cli(cache_args(tiny, tmp_path / "c", "--top-k", 4, "--max-length", 12))
    assert result.exit_code == 0, result.output
    assert "24 of 24 examples are longer than --max-length 12 and were cut" in flat(result.output)
    result = run_cli(cache_args(tiny, tmp_path / "d", "--top-k", 4, "--max-length", 512))
    assert_one_line_error(result, "--max-length 512 is longer than", "max_position_embeddings 256")


# ----------------------------------------------------------------------------- the right words


@pytest.fixture(scope="module")
def small_cache(tiny, tmp_path_factory):
    """A cache of its own (these tests damage copies of it)."""
    cache = tmp_path_factory.mktemp("words") / "cache"
    result = run_cli(cache_args(tiny, cache, *CACHE_OPTIONS))
    assert result.exit_code == 0, result.output
    return cache


def damaged_copy(cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the cache and the path of one chunk file of its tuned log-probs."""
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    chunk = next(p for p in (copy / "shards").rglob("tuned_logprobs/c/*/*") if p.is_file())
    return copy, chunk


def test_inspect_example_refuses_a_cache_with_a_deleted_chunk(small_cache, tmp_path):
    copy, chunk = damaged_copy(small_cache, tmp_path)
    chunk.unlink()
    result = run_cli(["inspect", copy, "--example", 0])
    assert_one_line_error(result, "tuned_logprobs has 0 of its 1 chunk files", "damaged")


def test_a_flipped_byte_read_without_verification_is_one_line(tiny, small_cache, tmp_path):
    copy, chunk = damaged_copy(small_cache, tmp_path)
    data = bytearray(chunk.read_bytes())
    data[4:12] = bytes(b ^ 0xFF for b in data[4:12])  # the codec's header: sizes no longer agree
    chunk.write_bytes(bytes(data))
    for workers in (0, 2):  # read inline, and in DataLoader workers
        out = tmp_path / f"run-{workers}"
        args = distill_args(copy, tiny.student, out, "--no-verify-cache", "--max-steps", 2)
        args[args.index("--num-workers") + 1] = workers
        result = run_cli(args)
        assert_one_line_error(result, "a chunk does not decode", "inspect", "--verify")
        assert "Traceback" not in result.output and "worker process" not in result.output


def test_weights_with_nan_are_refused_at_load_naming_the_tensor(tiny, tmp_path):
    broken = tmp_path / "nan-student"
    shutil.copytree(tiny.student, broken)
    tensors = load_file(broken / "model.safetensors")
    name = sorted(tensors)[1]
    tensors[name][0] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = run_cli(["eval", "--model", broken, "--data", tiny.test, "--limit", 2,
                      "--device", "cpu"])  # fmt: skip
    assert_one_line_error(result, f"the weight {name}", "NaN or infinite")


def test_a_model_whose_vocabulary_is_below_its_tokenizers_is_refused_by_eval(tiny, tmp_path):
    from conftest import build_model

    small = build_model(tmp_path / "small", tiny.tokenizer, 1, 32, seed=4,
                        vocab_rows=tiny.vocab_size - 8)  # fmt: skip
    result = run_cli(["eval", "--model", small, "--data", tiny.test, "--limit", 2,
                      "--device", "cpu"])  # fmt: skip
    assert_one_line_error(result, f"output layer has {tiny.vocab_size - 8} rows")


def test_a_broken_symlink_model_is_named_as_such(tiny, tmp_path):
    link = tmp_path / "student"
    link.symlink_to(tmp_path / "deleted-student")
    result = run_cli(["eval", "--model", link, "--data", tiny.test, "--device", "cpu"])
    assert_one_line_error(result, "is a broken symlink")
    assert "did you mean" not in result.output


def test_a_missing_tokenizer_message_is_whole(tiny, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny.student, bare)
    for path in bare.iterdir():
        if "token" in path.name or path.name == "special_tokens_map.json":
            path.unlink()
    result = run_cli(["eval", "--model", bare, "--data", tiny.test, "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not flat(result.output).rstrip().endswith("from one of:")


def test_a_config_whose_out_is_the_config_itself_is_refused(tiny, small_cache, tmp_path):
    config = tmp_path / "run.yaml"
    text = (f"cache: {small_cache}\nstudent: {tiny.student}\nout: {config}\noverwrite: true\n"
            "max_steps: 1\n")  # fmt: skip
    config.write_text(text)
    result = run_cli(["distill", "--config", config])
    assert_one_line_error(result, "is the config file itself")
    assert config.read_text() == text


def test_a_damaged_student_is_not_called_only_another_student(tiny, small_cache, tmp_path):
    changed = tmp_path / "student"
    shutil.copytree(tiny.student, changed)
    tensors = load_file(changed / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    result = run_cli(distill_args(small_cache, changed, tmp_path / "out", "--max-steps", 1))
    assert_one_line_error(result, "changed or damaged", "--frozen-student")


def test_every_test_the_reliability_page_names_exists():
    """docs/reliability.md names the test that holds each promise: each name is a real test."""
    import re

    page = (REPO / "docs" / "reliability.md").read_text()
    modules = {path.stem for path in (REPO / "tests").glob("test_*.py")}
    named = set(re.findall(r"\b(test_\w+)\b", page)) - modules
    defined = {
        name
        for path in (REPO / "tests").glob("test_*.py")
        for name in re.findall(r"^def (test_\w+)", path.read_text(), re.MULTILINE)
    }
    assert len(named) > 30 and named <= defined, sorted(named - defined)
