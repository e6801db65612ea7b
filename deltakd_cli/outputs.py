"""Where deltakd writes, and the promises it keeps there (docs/reliability.md):

- an output is never an input, and never inside or around one (`check_not_input`);
- ownership by proof: deltakd writes into, and --overwrite removes, only the entries its own
  marker lists as created by deltakd; a directory holding anything else is refused naming it,
  --overwrite or not (`claim_directory`, `remove_own_files`);
- one run at a time per output: an exclusive lock held for the whole run, naming its holder
  (`OutputLock`); the lock of a dead process is no lock (flock is released by the kernel);
- files appear whole or not at all (`atomic_write_text`: a temp name, then a rename);
- a failed write (a full disk), whichever library raised it, is one line naming the path, the
  bytes it needed and what is free (`writing`, `failed_write`, `write_error`)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deltakd_cli import __version__, faults
from deltakd_cli.errors import DeltakdError, WriteFailed

MARKER = ".deltakd-output.json"  # the kind of output a directory holds
LOCK = ".deltakd.lock"  # held (flock) by the run writing the directory
PARTIAL_SUFFIX = ".partial"  # a file being written; never read as data


# ----------------------------------------------------------------------------- paths


def is_url(location: str) -> bool:
    """An fsspec URL (s3://, gs://, memory://...); file:// is a local path."""
    return "://" in location and not location.startswith("file://")


def local_path(spec: str | Path) -> str:
    """A path option as a local path: `file:///abs` -> `/abs`, `~` expanded."""
    text = str(spec)
    if text.startswith("file://"):
        text = text[len("file://") :] or "/"
    return os.path.expanduser(text)


def _resolved(spec: str | Path) -> Path:
    return Path(local_path(spec)).resolve()


def check_not_input(
    out: str | Path,
    inputs: dict[str, str | Path | None] | Iterable[tuple[str, str | Path | None]],
    option: str = "--out",
) -> None:
    """Refuse an output that is an input, holds an input, or sits inside an input directory
    (a model, a cache): writing there would replace or alter what the run reads. Inputs are
    named by their option (pairs where one option is given several times, e.g. eval's --model);
    those that are not local paths (hub ids, URLs) cannot collide and are skipped."""
    if is_url(str(out)):
        return
    target = _resolved(out)
    for name, spec in inputs.items() if isinstance(inputs, dict) else inputs:
        if spec is None or is_url(str(spec)):
            continue
        source_path = Path(local_path(spec))
        if not source_path.exists():
            continue
        source = source_path.resolve()
        if target == source:
            raise DeltakdError(
                f"{option} {out} is the same path as {name} {spec}: an output never replaces "
                "an input; choose another path"
            )
        if source.is_relative_to(target):
            raise DeltakdError(
                f"{option} {out} contains {name} {spec}: an output never holds an input; "
                "choose another path"
            )
        if source.is_dir() and target.is_relative_to(source):
            raise DeltakdError(
                f"{option} {out} is inside {name} {spec}: writing there would alter an input; "
                "choose a path outside it"
            )


# ----------------------------------------------------------------------------- write errors


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


# torch.save's stream writer reports a short write without the OS's reason (a full disk, mostly).
TORCH_SHORT_WRITE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")
NEARLY_FULL_BYTES = 1 << 20  # a short write with less free than this (or than it needed): no space


def failed_write(
    error: BaseException, path: str | Path, needed: int | None = None
) -> OSError | None:
    """The OS error behind a failed write, whichever library raised it; None when `error` is
    not a failed write. An OSError is itself; safetensors' SafetensorError carries the code in
    its text ('... No space left on device (os error 28)'); torch.save's RuntimeError ('unexpected
    pos N vs M', 'file write failed') carries none, so a short write onto a file system with
    less free than it needed (or than 1 MiB) is a full disk, any other an I/O error."""
    if isinstance(error, OSError):
        return error
    text = str(error)
    if type(error).__name__ == "SafetensorError":
        match = _OS_ERROR_CODE.search(text)
        if match is None:
            return None
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    if isinstance(error, RuntimeError) and any(mark in text for mark in TORCH_SHORT_WRITE):
        free = _free_bytes(Path(local_path(path)) if not is_url(str(path)) else Path(str(path)))
        full = free is not None and free < max(needed or 0, NEARLY_FULL_BYTES)
        if full:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return OSError(errno.EIO, f"the write was cut short (torch.save: {text.strip()})")
    return None


def write_error(error: OSError, path: str | Path, needed: int | None = None) -> WriteFailed:
    """One line for a failed write: the path, and for a full disk the bytes it needed and what
    is free there."""
    path = Path(local_path(path)) if not is_url(str(path)) else Path(str(path))
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path)
        sizes = [f"needed about {_size(needed)}"] if needed else []
        sizes += [f"{_size(free)} free"] if free is not None else []
        detail = "no space left on the device" + (f" ({', '.join(sizes)})" if sizes else "")
        return WriteFailed(
            f"cannot write {path}: {detail}; free some space and rerun the same command"
        )
    reason = error.strerror or type(error).__name__
    return WriteFailed(f"cannot write {path}: {reason}")


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def writing(
    path: str | Path, needed: int | None = None, discard: str | Path | None = None
) -> Iterator[None]:
    """The one place a failed write becomes one clear line (an OSError, torch.save's short write
    or safetensors' I/O error: `failed_write`), naming `path` and the free space; `discard` (a
    temp file or folder) is removed first, so nothing half-written stays behind. Any other
    error passes through unchanged."""
    try:
        yield
    except WriteFailed:  # a write inside this one, already named
        if discard is not None:
            _discard(Path(discard))
        raise
    except Exception as error:
        cause = failed_write(error, path, needed)
        if cause is None:
            raise
        if discard is not None:
            _discard(Path(discard))
        raise write_error(cause, path, needed) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `path` whole or not at all: a temp file beside it, then a rename."""
    path = Path(path)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    data = text.encode("utf-8")
    with writing(path, len(data)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            faults.point(f"write {path.name}")
            partial.write_bytes(data)
            faults.point(f"rename {path.name}")
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


# ----------------------------------------------------------------------------- locks


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(["deltakd", *sys.argv[1:]])[:300],
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An exclusive lock on one output, held for a whole run.

    The lock is `flock` on a small file that also names its holder (pid, host, command), so a
    refused run can say who holds it. The kernel drops an flock when its process dies (kill -9
    included), so a stale lock of a dead process is no lock. Where the file system has no flock
    (some network mounts), the file's content decides: a holder on this host that is no longer
    alive is stale and taken over; a holder on another host is refused (remove the file by hand
    once that run is gone). See docs/reliability.md for shared file systems."""

    def __init__(self, lock_path: str | Path, what: str):
        self.path = Path(lock_path)
        self.what = what
        self.fd: int | None = None
        self.made_folder = False  # the lock created its folder: release removes it if empty
        self.held = False  # release touches the file only when this lock took it

    def _refuse(self, holder: dict[str, Any] | None) -> DeltakdError:
        if holder:
            who = (
                f"pid {holder.get('pid')} on {holder.get('host')}, started "
                f"{holder.get('started')}: {holder.get('command')}"
            )
        else:
            who = "another process"
        return DeltakdError(
            f"{self.what} is in use by another deltakd run ({who}); wait for it to finish or "
            f"stop it (lock file {self.path})"
        )

    def _read_holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def acquire(self) -> OutputLock:
        import fcntl

        if self.path.exists() and not _is_own_lock(self.path):
            raise DeltakdError(
                f"{self.path} exists and is not a deltakd lock file; deltakd does not write "
                "over it: move it, or choose another output"
            )
        with writing(self.path):
            self.made_folder = not self.path.parent.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(self._read_holder()) from None
            except OSError as error:  # no flock on this file system: the content decides
                os.close(fd)
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                return self._acquire_by_content()
            # The holder before us may have removed the file between our open and our flock:
            # then we hold a lock on a file nobody else will see; start again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        self.held = True
        payload = json.dumps(_holder()).encode()
        os.ftruncate(fd, 0)
        os.write(fd, payload)
        return self

    def _acquire_by_content(self) -> OutputLock:
        holder = self._read_holder()
        if holder:
            here = holder.get("host") == socket.gethostname()
            if not here or _pid_alive(int(holder.get("pid", -1))):
                raise self._refuse(holder)
        atomic_write_text(self.path, json.dumps(_holder()))
        self.held = True
        return self

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in this order, see `acquire`); a lock never
        taken (refused) touches nothing."""
        if not self.held:
            return
        self.held = False
        try:
            self.path.unlink(missing_ok=True)
            if self.made_folder and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()  # a run that stopped before writing leaves nothing
        except OSError:
            pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def directory_lock(directory: str | Path, what: str) -> OutputLock:
    """The lock of an output directory (a file inside it)."""
    return OutputLock(Path(directory) / LOCK, what)


def file_lock(path: str | Path, what: str) -> OutputLock:
    """The lock of an output file (a file beside it)."""
    path = Path(path)
    return OutputLock(path.with_name(path.name + ".lock"), what)


# ----------------------------------------------------------------------------- kinds
#
# Ownership is proved, never guessed from names: a directory is deltakd's output when it holds
# deltakd's marker, and only the entries the marker lists (by name, relative to the directory)
# were created by deltakd. deltakd writes into, and --overwrite removes, those entries and
# nothing else; a directory holding any other entry is refused, naming it.


def parse_marker(text: str) -> dict[str, Any] | None:
    """deltakd's marker from its text, or None: a file of that name that is not deltakd's
    marker (not a JSON object written by deltakd) is no marker, and is the user's."""
    try:
        marker = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(marker, dict) or marker.get("tool") != "deltakd":
        return None
    if not isinstance(marker.get("kind"), str) or not isinstance(marker.get("files", []), list):
        return None
    return marker


def read_marker(directory: str | Path) -> dict[str, Any] | None:
    """deltakd's marker of `directory`, or None (see `parse_marker`)."""
    try:
        return parse_marker((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def marker_text(kind: str, files: Iterable[str] = ()) -> str:
    """The marker of an output of `kind`, and the entries deltakd created there (all it may
    write into or remove)."""
    marker = {
        "tool": "deltakd",
        "version": __version__,
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "files": sorted(set(files) - {MARKER}),
    }
    return json.dumps(marker, indent=2) + "\n"


def write_marker(directory: str | Path, kind: str, files: Iterable[str] = ()) -> None:
    """Record that `directory` is a deltakd output of `kind` (see `marker_text`)."""
    atomic_write_text(Path(directory) / MARKER, marker_text(kind, files))


def add_marker_files(directory: str | Path, files: Iterable[str]) -> None:
    """Add names to the marker's list of entries deltakd created (before creating them)."""
    marker = read_marker(directory)
    if marker is None:
        return
    write_marker(directory, marker["kind"], [*marker.get("files", []), *files])


def _is_own_lock(path: Path) -> bool:
    """A lock file deltakd wrote (its holder record), or an empty one (being written)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if not text.strip():
        return True
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(holder, dict) and "pid" in holder and "command" in holder


def visible_entries(directory: Path) -> list[str]:
    """Names in a directory, leaving out deltakd's own lock file (a user's file of that name
    is kept in) and the marker's half-written `.partial` (a run killed while claiming the
    folder left it; the marker's next write replaces it)."""
    if not directory.is_dir():
        return []
    return sorted(
        p.name
        for p in directory.iterdir()
        if not (p.name == LOCK and _is_own_lock(p)) and p.name != MARKER + PARTIAL_SUFFIX
    )


def foreign_names(names: Iterable[str], owned: Iterable[str]) -> list[str]:
    """Those of `names` deltakd did not create: not in `owned`, nor a half-written
    `NAME.partial` of an owned NAME."""
    own = set(owned)
    return sorted(
        name
        for name in names
        if name not in own
        and not (name.endswith(PARTIAL_SUFFIX) and name[: -len(PARTIAL_SUFFIX)] in own)
    )


def foreign_entries(directory: str | Path, owned: Iterable[str]) -> list[str]:
    """The entries of `directory` deltakd did not create (`foreign_names`), its own marker and
    lock left out."""
    path = Path(directory)
    own = set(owned)
    if read_marker(path) is not None:
        own.add(MARKER)
    return foreign_names(visible_entries(path), own)


def _named(entries: list[str], limit: int = 6) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def refuse_foreign(
    directory: str | Path, entries: list[str], label: str, option: str = "--out"
) -> DeltakdError:
    """The one line for an output directory holding entries deltakd did not create."""
    return DeltakdError(
        f"{option} {directory} holds entries deltakd did not create ({_named(entries)}); it is "
        f"not taken for the {label}, and --overwrite never touches them; choose a new or empty "
        "directory"
    )


def claim_directory(
    directory: str | Path,
    kind: str,
    label: str,
    overwrite: bool,
    planned: Iterable[str] = (),
    recognise: Callable[[Path], Iterable[str] | None] | None = None,
    option: str = "--out",
) -> str:
    """Decide whether a run may write `directory` as an output of `kind`, by proof:

    'new'   it does not exist or is empty: created, and marked as `kind`;
    'ours'  its marker says `kind` and every entry is one the marker lists (the caller decides:
            resume, complete, or refuse; under --overwrite it removes the listed entries);
    with `overwrite`, a deltakd output of another kind whose entries are all listed has them
    removed and is taken ('new').

    A directory holding any entry its marker does not list (or holding anything, without a
    marker) is refused naming those entries, --overwrite or not. `recognise(path)` proves an
    output of an earlier deltakd without a marker from its own record (a run's run.json), and
    returns the entries that record makes deltakd's (None: not such an output). `planned`:
    entries the run will create, listed at the claim (the directory holds none of them then
    that is not deltakd's)."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise DeltakdError(f"--out {directory} exists and is not a directory")
    planned = list(planned)
    marker = read_marker(path)
    if marker is None:
        entries = visible_entries(path)
        if not entries:
            with writing(path):
                path.mkdir(parents=True, exist_ok=True)
            write_marker(path, kind, planned)
            return "new"
        owned = recognise(path) if recognise is not None else None
        if owned is None:
            raise refuse_foreign(directory, entries, label, option)
        owned = list(owned)
        foreign = foreign_entries(path, owned)
        if foreign:
            raise refuse_foreign(directory, foreign, label, option)
        write_marker(path, kind, [*owned, *planned])
        return "ours"
    listed = [name for name in marker.get("files", []) if isinstance(name, str)]
    foreign = foreign_entries(path, listed)
    if foreign:
        raise refuse_foreign(directory, foreign, label, option)
    if marker["kind"] == kind:
        if planned:
            write_marker(path, kind, [*listed, *planned])
        return "ours"
    if not overwrite and any(name != MARKER for name in visible_entries(path)):
        raise DeltakdError(
            f"--out {directory} holds a deltakd {marker['kind']} output, not a {label}; choose "
            "another directory, or pass --overwrite (which removes only what deltakd created "
            "there)"
        )
    remove_own_files(path, listed)
    write_marker(path, kind, planned)
    return "new"


def remove_own_files(directory: str | Path, names: Iterable[str]) -> None:
    """Remove the named entries of an output directory (what deltakd created, as its marker
    lists them) and their half-written `NAME.partial`; everything else stays."""
    path = Path(directory)
    for name in set(names):
        if not name or "/" in name or name in (".", "..", LOCK, MARKER):
            continue
        for target in (path / name, path / (name + PARTIAL_SUFFIX)):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()


# ----------------------------------------------------------------------------- readers

# The file each model-producing command writes last (docs/reliability.md, promise 1).
RUN_RECORD = "run.json"  # distill, finetune
STUDENT_RECORD = "init-student.json"  # init-student


def unfinished_model(folder: str | Path) -> str | None:
    """Why `folder` is an unfinished deltakd output that no reader may take for a model, and how
    to finish it; None when it is not one. A training run is unfinished with its export's
    staging folder (`.export.partial`: stopped mid-export, the previous step's weights may be at
    the top level) or without run.json where its marker or its checkpoints/ say it is a run; a
    base student is unfinished without init-student.json."""
    path = Path(folder)
    marker = read_marker(path) or {}
    again = "rerun its distill or finetune command with --resume to finish it"
    if (path / ".export.partial").exists():
        return f"its export did not finish (.export.partial); {again}"
    if not (path / RUN_RECORD).exists():
        if marker.get("kind") == "training-run" or (path / "checkpoints").is_dir():
            return f"a training run that did not finish (no {RUN_RECORD}); {again}"
    if marker.get("kind") == "student" and not (path / STUDENT_RECORD).exists():
        return (
            f"a base student that did not finish (no {STUDENT_RECORD}); rerun its init-student "
            "command to finish it"
        )
    return None


def check_finished_model(folder: str | Path, spec: str | Path) -> None:
    """Refuse an unfinished model folder (`unfinished_model`) in one line naming it."""
    reason = unfinished_model(folder)
    if reason is not None:
        raise DeltakdError(f"{spec}: {reason}")


def is_local_location(text: str) -> bool:
    """A recorded location that is a path on this machine (absolute, ~, ./, ../ or a Windows
    drive), not a Hub id."""
    return text.startswith(("/", "~", "./", "../", "file://", "\\")) or (
        len(text) > 1 and text[1] == ":"
    )


def public_name(text: str) -> str:
    """A recorded location as a card shows it: a Hub id as it is, a local path by its last
    part only (`/tmp/x/student` -> `student`): a card never shows where a file lay here."""
    text = str(text)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if not is_local_location(text) and text.count("/") <= 1 and not text.endswith("/"):
        return text  # a Hub id (org/name, or name), or a bare file name
    return re.split(r"[/\\]", text.rstrip("/\\"))[-1] or text
