"""outputs.py: locks between real processes, output kinds, outputs that are inputs, whole-file
writes and the one-line form of a full disk."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
from helpers import assert_one_line_error, cache_args, run_cli

from deltakd_cli import faults, outputs
from deltakd_cli.cache import manifest
from deltakd_cli.errors import DeltakdError, WriteFailed
from deltakd_cli.init_student import run as init_student
from deltakd_cli.pipeline.run import PIPELINE_NAMES, pipeline_output
from deltakd_cli.report import run as report_run
from deltakd_cli.train.export import RUN_FILES

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
    outputs.add_marker_files(out, ["model.safetensors"])
    (out / "model.safetensors").write_text("x")
    with pytest.raises(DeltakdError, match="holds a deltakd training-run output, not a cache"):
        outputs.claim_directory(out, "cache", "cache", False)
    # an output of another kind, taken with --overwrite: only the files its marker lists go
    assert outputs.claim_directory(out, "cache", "cache", True) == "new"
    assert sorted(p.name for p in out.iterdir()) == [outputs.MARKER]


def test_a_folder_deltakd_did_not_create_is_refused_even_with_overwrite(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("theirs")
    for overwrite in (False, True):
        with pytest.raises(DeltakdError, match=r"did not create \(config.json\)"):
            outputs.claim_directory(foreign, "training-run", "training run", overwrite)
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json"]
    # a user file added to deltakd's own output is foreign there too, and named
    out = tmp_path / "out"
    outputs.claim_directory(out, "report", "report directory", False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DeltakdError, match=r"\(notes.txt\)"):
        outputs.claim_directory(out, "report", "report directory", True)
    assert (out / "notes.txt").read_text() == "mine"


def test_names_alone_prove_nothing(tmp_path):
    """Folders named like deltakd's (checkpoints/, run.json, data/...) and files named like its
    marker and lock are the user's unless deltakd's own record says otherwise."""
    user = tmp_path / "u"
    (user / "checkpoints").mkdir(parents=True)
    (user / "checkpoints" / "epoch=3.ckpt").write_text("mine")
    (user / "run.json").write_text('{"mine": true}')
    (user / outputs.MARKER).write_text('{"kind": "training-run", "files": ["checkpoints"]}')
    with pytest.raises(DeltakdError, match="checkpoints"):
        outputs.claim_directory(user, "training-run", "training run", True)
    assert (user / "checkpoints" / "epoch=3.ckpt").read_text() == "mine"
    lock_owner = tmp_path / "l"
    lock_owner.mkdir()
    (lock_owner / outputs.LOCK).write_text("my notes")
    with pytest.raises(DeltakdError, match="not a deltakd lock file"):
        outputs.directory_lock(lock_owner, "out").acquire()
    assert (lock_owner / outputs.LOCK).read_text() == "my notes"


def test_an_earlier_output_is_recognised_by_its_own_record_only(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / "checkpoints").mkdir()

    def recognise(path):
        return ["run.json", "checkpoints"] if (path / "run.json").read_text() != "{}" else None

    with pytest.raises(DeltakdError, match="did not create"):
        outputs.claim_directory(out, "training-run", "training run", False, recognise=recognise)
    (out / "run.json").write_text('{"tool": "deltakd"}')
    assert outputs.claim_directory(out, "training-run", "training run", False, [], recognise) == (
        "ours"
    )
    assert outputs.read_marker(out)["files"] == ["checkpoints", "run.json"]


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


def test_the_libraries_write_errors_are_failed_writes(tmp_path, monkeypatch):
    """torch.save's short write (a RuntimeError, no errno) and safetensors' SafetensorError are
    failed writes like an OSError; other errors are not."""
    from safetensors import SafetensorError

    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    full = SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )
    assert outputs.failed_write(full, tmp_path).errno == errno.ENOSPC
    quota = SafetensorError("I/O error: Disk quota exceeded (os error 122)")
    assert outputs.failed_write(quota, tmp_path).errno == errno.EDQUOT
    # torch does not say why: on a nearly full file system it is no space, otherwise an I/O error
    assert outputs.failed_write(short, tmp_path).errno == errno.EIO
    monkeypatch.setattr(outputs, "_free_bytes", lambda path: 1000)
    assert outputs.failed_write(short, tmp_path).errno == errno.ENOSPC
    assert outputs.failed_write(RuntimeError("CUDA out of memory"), tmp_path) is None
    assert outputs.failed_write(SafetensorError("invalid header"), tmp_path) is None
    assert outputs.failed_write(ValueError("unexpected pos"), tmp_path) is None


def test_writing_maps_every_failed_write_to_one_line_and_discards_the_partial(tmp_path):
    from safetensors import SafetensorError

    partial = tmp_path / ".step-2.partial"
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"half")
    error = SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )
    with pytest.raises(WriteFailed) as raised, outputs.writing(tmp_path / "step-2", 10, partial):
        raise error
    assert str(raised.value).startswith(f"cannot write {tmp_path / 'step-2'}: no space left")
    assert "needed about 10 bytes" in str(raised.value) and " free)" in str(raised.value)
    assert not partial.exists()
    with pytest.raises(KeyError), outputs.writing(tmp_path / "x"):  # not a write: untouched
        raise KeyError("x")


# ----------------------------------------------------------------------------- every command
#
# Each command that writes, pointed at a folder holding a user file under every name deltakd
# itself uses there (its files and folders, its marker, its lock), with and without
# --overwrite: refused in one line naming what is there, and not one byte of it changed.

MODEL_NAMES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json")  # fmt: skip
OWN_MARKS = (outputs.MARKER,)  # the lock: see `assert_refused_untouched`


def user_folder(path, names):
    """A folder of the user's: a file under each name (a folder holding one, for names deltakd
    uses as folders)."""
    folders = {"checkpoints", "shards", "runs", "wandb", "mlruns", "models", "cache", "eval",
               "data", "report", "init-student", "pruned", "healed", "heal-cache", "assets",
               "wheels", "cache-validation", "eval-validation", "adapter"}  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name in folders:
            (path / name).mkdir()
            (path / name / "mine.txt").write_text(f"the user's {name}")
        else:
            (path / name).write_text(f"the user's {name}")
    return path


def snapshot(path):
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
        for p in sorted(path.rglob("*"))
    }


def assert_refused_untouched(args, folder, *fragments, lock=outputs.LOCK):
    """Refused naming `fragments`, with and without --overwrite; then again with a user file
    where deltakd's lock goes (refused before anything is opened for writing)."""
    for lock_too in (False, lock is not None):
        if lock_too:
            (folder / lock).write_text("the user's lock-named file")
            fragments = ("not a deltakd lock file",)
        before = snapshot(folder)
        for extra in ([], ["--overwrite"]):
            result = run_cli([*args, *extra])
            assert_one_line_error(result, *fragments)
            assert snapshot(folder) == before, extra


@pytest.fixture(scope="module")
def small_cache(tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ownership") / "cache"
    result = run_cli(cache_args(tiny, cache, "--top-k", 4))
    assert result.exit_code == 0, result.output
    return cache


def test_cache_teachers_never_touches_a_folder_it_did_not_create(tiny, tmp_path):
    names = [*manifest.OWN_NAMES, *OWN_MARKS]
    folder = user_folder(tmp_path / "c", names)
    assert_refused_untouched(cache_args(tiny, folder, "--top-k", 4), folder, "did not create",
                             "manifest.json", "shards")  # fmt: skip


@pytest.mark.parametrize("command", ["distill", "finetune"])
def test_training_never_touches_a_folder_it_did_not_create(tiny, small_cache, tmp_path, command):
    names = [*RUN_FILES, *MODEL_NAMES, *OWN_MARKS]
    folder = user_folder(tmp_path / "u", names)
    if command == "distill":
        args = ["distill", "--cache", small_cache, "--student", tiny.student]
    else:
        args = ["finetune", "--model", tiny.student, "--data", tiny.train]
    args += ["--out", folder, "--max-steps", 1, "--device", "cpu", "--num-workers", 0]
    assert_refused_untouched(args, folder, "did not create", "README.md", "checkpoints")


def test_the_reported_case_a_user_checkpoints_folder_and_readme(tiny, small_cache, tmp_path):
    """Issue 22: `u/checkpoints/epoch=3.ckpt` and `u/README.md` were taken for a run: the card
    replaced the README and --overwrite deleted the checkpoints."""
    folder = tmp_path / "u"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "epoch=3.ckpt").write_text("mine")
    (folder / "README.md").write_text("notes")
    args = ["distill", "--cache", small_cache, "--student", tiny.student, "--out", folder,
            "--max-steps", 1, "--device", "cpu", "--num-workers", 0]  # fmt: skip
    assert_refused_untouched(args, folder, "README.md, checkpoints")


def test_eval_never_replaces_a_file_it_did_not_write(tiny, tmp_path):
    report = tmp_path / "report.json"
    for name in ("report.json", "report.generations.jsonl"):
        (tmp_path / name).write_text(f"the user's {name}")
    args = ["eval", "--model", tiny.student, "--data", tiny.test, "--protocol", "greedy",
            "--max-new-tokens", 2, "--out", report, "--device", "cpu"]  # fmt: skip
    assert_refused_untouched(args, tmp_path, "not an eval output deltakd wrote", lock=None)
    report.unlink()
    assert_refused_untouched(args, tmp_path, "report.generations.jsonl", lock=None)
    (tmp_path / "report.generations.jsonl").unlink()
    (tmp_path / "report.json.lock").write_text("the user's")
    assert_refused_untouched(args, tmp_path, "not a deltakd lock file", lock=None)
    (tmp_path / "report.json.lock").unlink()
    # the report deltakd wrote (and the generations file it names) is replaced under --overwrite
    assert run_cli(args).exit_code == 0
    assert run_cli([*args, "--overwrite"]).exit_code == 0


def test_init_student_never_touches_folders_it_did_not_create(tiny, tmp_path):
    out = user_folder(tmp_path / "s", [*MODEL_NAMES, "init-student.json", *OWN_MARKS])
    work = user_folder(tmp_path / "w", [*init_student.WORK_NAMES, *OWN_MARKS])
    args = ["init-student", "--source", tiny.teacher_base, "--out", out, "--work-dir", work,
            "--layers", 1, "--device", "cpu"]  # fmt: skip
    assert_refused_untouched(args, out, "did not create", "init-student.json")
    assert all((work / name).exists() for name in init_student.WORK_NAMES)
    assert outputs.read_marker(work) is None
    # OUT empty, the work dir the user's: refused there too
    empty = tmp_path / "empty"
    empty.mkdir()
    args[args.index("--out") + 1] = str(empty)
    assert_refused_untouched(args, work, "--work-dir", "did not create", "heal-rows.jsonl")


def test_report_never_touches_a_folder_it_did_not_create(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3}) + "\n" for s in (1, 2))
    )
    names = [report_run.INDEX, "loss.png", "loss.csv", "rougeL.png", "rougeL.csv", "sweep.png",
             "differences.png", "differences.csv", "sweep.csv", *OWN_MARKS]  # fmt: skip
    folder = user_folder(tmp_path / "r", names)
    assert_refused_untouched(["report", run, "--out", folder], folder, "did not create",
                             "index.html")  # fmt: skip


@pytest.mark.parametrize("names", [PIPELINE_NAMES, ("data",)])
def test_pipeline_and_demo_never_take_a_folder_they_did_not_create(tmp_path, names):
    """pipeline and demo both hold OUT through `pipeline_output` (a full run is too slow here):
    a folder with any of their names is refused, the user's data/train.jsonl kept."""
    folder = user_folder(tmp_path / "p", [*names, *OWN_MARKS, outputs.LOCK])
    (folder / "data" / "train.jsonl").write_text('{"prompt": "mine"}\n')
    before = snapshot(folder)
    with pytest.raises(DeltakdError, match="not a deltakd lock file"):
        with pipeline_output(folder):
            pytest.fail("a pipeline ran in a folder it did not create")
    (folder / outputs.LOCK).unlink()
    before = snapshot(folder)
    with pytest.raises(DeltakdError, match="did not create") as refused:
        with pipeline_output(folder):
            pytest.fail("a pipeline ran in a folder it did not create")
    assert ("data" if names == ("data",) else "assets") in str(refused.value)
    assert snapshot(folder) == before
    # a pipeline's own folder is taken again
    own = tmp_path / "own"
    with pipeline_output(own):
        (own / "data").mkdir()
    with pipeline_output(own):
        pass


def test_a_marker_left_half_written_by_a_kill_does_not_lock_the_folder_out(tmp_path):
    """A run killed while writing the marker of a new folder leaves only MARKER.partial: the
    rerun claims the folder as new (found by the distill kill test at a random point)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / (outputs.MARKER + outputs.PARTIAL_SUFFIX)).write_text('{"kind": "trai')
    assert outputs.claim_directory(out, "training-run", "training run", False) == "new"
    assert outputs.read_marker(out)["kind"] == "training-run"
    assert not (out / (outputs.MARKER + outputs.PARTIAL_SUFFIX)).exists()
