"""outputs.py: locks between real processes, output kinds, outputs that are inputs, whole-file
writes and the one-line form of a full disk."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from deltakd_cli import faults, outputs
from deltakd_cli.errors import DeltakdError

HOLD_LOCK = """
import sys, time
from deltakd_cli import outputs
lock = outputs.directory_lock(sys.argv[1], "test output").acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_a_lock_held_by_another_process_is_refused_with_its_pid(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DeltakdError) as refused:
            outputs.directory_lock(tmp_path / "out", "test output").acquire()
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and "in use by another deltakd run" in message
    finally:
        holder.kill()
        holder.wait()
    # The holder died (kill -9): the kernel dropped its lock; the stale file is taken over.
    assert (tmp_path / "out" / outputs.LOCK).exists()
    lock = outputs.directory_lock(tmp_path / "out", "test output").acquire()
    assert json.loads((tmp_path / "out" / outputs.LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "out" / outputs.LOCK).exists()


@pytest.mark.slow
def test_without_flock_a_dead_holder_on_this_host_is_stale(tmp_path, monkeypatch):
    """The fallback for file systems without flock: the lock file's content decides."""
    import fcntl
    import socket

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock_file = tmp_path / outputs.LOCK
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    here = socket.gethostname()
    lock_file.write_text(json.dumps({"pid": int(dead), "host": here, "command": "old"}))
    outputs.directory_lock(tmp_path, "out").acquire().release()  # stale: taken over
    lock_file.write_text(json.dumps({"pid": os.getpid(), "host": here, "command": "live"}))
    with pytest.raises(DeltakdError, match="in use by another deltakd run"):
        outputs.directory_lock(tmp_path, "out").acquire()
    lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "remote"}))
    with pytest.raises(DeltakdError, match="on elsewhere"):
        outputs.directory_lock(tmp_path, "out").acquire()


def test_a_lock_that_made_its_folder_removes_it_when_nothing_was_written(tmp_path):
    lock = outputs.directory_lock(tmp_path / "new", "out").acquire()
    lock.release()
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    outputs.directory_lock(tmp_path / "kept", "out").acquire().release()
    assert (tmp_path / "kept").is_dir()


def test_outputs_never_equal_hold_or_sit_inside_an_input(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(DeltakdError, match="same path as --data"):
        outputs.check_not_input(data, {"--data": str(data)})
    with pytest.raises(DeltakdError, match="contains --data"):
        outputs.check_not_input(tmp_path, {"--data": str(data)})
    with pytest.raises(DeltakdError, match="inside --model"):
        outputs.check_not_input(model / "out", {"--model": str(model)})
    with pytest.raises(DeltakdError, match="same path as --model"):
        outputs.check_not_input(f"file://{model}", {"--model": str(model)})
    # hub ids, URLs and missing paths cannot collide
    outputs.check_not_input(tmp_path / "out", {"--model": "org/name", "--data": None})
    outputs.check_not_input("s3://bucket/out", {"--data": str(data)})


def test_file_urls_are_local_paths():
    assert outputs.local_path("file:///abs/path") == "/abs/path"
    assert outputs.local_path("~/x") == os.path.expanduser("~/x")
    assert not outputs.is_url("file:///abs/path") and outputs.is_url("s3://b/k")


def test_claim_refuses_foreign_directories_and_overwrite_removes_only_deltakd_files(tmp_path):
    out = tmp_path / "out"
    assert outputs.claim_directory(out, "training-run", "training run", False) == "new"
    assert outputs.claim_directory(out, "training-run", "training run", False) == "ours"
    with pytest.raises(DeltakdError, match="holds a deltakd training-run output, not a cache"):
        (out / "model.safetensors").write_text("x")
        outputs.claim_directory(out, "cache", "cache", False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("theirs")
    with pytest.raises(DeltakdError, match="files that deltakd did not write"):
        outputs.claim_directory(foreign, "training-run", "training run", False)
    assert outputs.claim_directory(foreign, "training-run", "training run", True) == "new"
    assert (foreign / "config.json").read_text() == "theirs"
    # an output of another kind, taken with --overwrite: only the files its marker lists go
    outputs.add_marker_files(out, ["model.safetensors"])
    (out / "notes.txt").write_text("mine")
    assert outputs.claim_directory(out, "cache", "cache", True) == "new"
    assert sorted(p.name for p in out.iterdir()) == [outputs.MARKER, "notes.txt"]


def test_a_half_written_file_never_appears(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old")
    monkeypatch.setenv(faults.FAULT_ENV, "enospc@2")  # at the rename, after the bytes were written
    faults.reset()
    with pytest.raises(DeltakdError, match="no space left"):
        outputs.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_disk_full_names_the_path_and_the_bytes(tmp_path):
    error = outputs.write_error(OSError(errno.ENOSPC, "No space left"), tmp_path / "x", 3 << 20)
    assert str(tmp_path / "x") in str(error) and "needed about 3.0 MiB" in str(error)
    assert "free" in str(error)
    other = outputs.write_error(OSError(errno.EACCES, "Permission denied"), tmp_path / "y")
    assert str(other) == f"cannot write {tmp_path / 'y'}: Permission denied"
