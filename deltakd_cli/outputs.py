"""Where deltakd writes, and the promises it keeps there (docs/reliability.md):

- an output is never an input, and never inside or around one (`check_not_input`);
- an output directory belongs to one kind of deltakd output; a non-empty directory that is not
  one is refused unless --overwrite, and --overwrite removes only what deltakd wrote
  (`claim_directory`, `remove_own_files`);
- one run at a time per output: an exclusive lock held for the whole run, naming its holder
  (`OutputLock`); the lock of a dead process is no lock (flock is released by the kernel);
- files appear whole or not at all (`atomic_write_text`: a temp name, then a rename);
- a failed write (a full disk) is one line naming the path and the bytes it needed
  (`writing`, `write_error`)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deltakd_cli import __version__, faults
from deltakd_cli.errors import DeltakdError

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
    out: str | Path, inputs: dict[str, str | Path | None], option: str = "--out"
) -> None:
    """Refuse an output that is an input, holds an input, or sits inside an input directory
    (a model, a cache): writing there would replace or alter what the run reads. Inputs that
    are not local paths (hub ids, URLs) cannot collide and are skipped."""
    if is_url(str(out)):
        return
    target = _resolved(out)
    for name, spec in inputs.items():
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


def write_error(error: OSError, path: str | Path, needed: int | None = None) -> DeltakdError:
    """One line for a failed write: a full disk names the path, the bytes and what is free."""
    path = Path(local_path(path)) if not is_url(str(path)) else Path(str(path))
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        detail = "no space left on the device"
        if needed:
            detail += f" (needed about {_size(needed)}"
            free = _free_bytes(path)
            detail += f", {_size(free)} free)" if free is not None else ")"
        return DeltakdError(
            f"cannot write {path}: {detail}; free some space and rerun the same command"
        )
    reason = error.strerror or type(error).__name__
    return DeltakdError(f"cannot write {path}: {reason}")


@contextmanager
def writing(path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into one clear line."""
    try:
        yield
    except OSError as error:
        raise write_error(error, path, needed) from None


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
        return self

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in this order, see `acquire`)."""
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


def read_marker(directory: str | Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def marker_text(kind: str, files: Iterable[str] = ()) -> str:
    """The marker of an output of `kind`, and the files deltakd put there (what --overwrite
    may remove)."""
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
    """Add names to the marker's list of files deltakd wrote."""
    marker = read_marker(directory) or {}
    kind = marker.get("kind")
    if kind is None:
        return
    write_marker(directory, kind, [*marker.get("files", []), *files])


def visible_entries(directory: Path) -> list[str]:
    """Names in a directory, leaving out deltakd's own lock and half-written files."""
    if not directory.is_dir():
        return []
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.name != LOCK and not p.name.endswith(PARTIAL_SUFFIX)
    )


def claim_directory(
    directory: str | Path,
    kind: str,
    label: str,
    overwrite: bool,
    legacy: Iterable[str] = (),
) -> str:
    """Decide whether a run may write `directory` as an output of `kind`:

    'new'   it does not exist or is empty (it is created, and marked as `kind`);
    'ours'  it holds a deltakd output of the same kind (the caller decides: resume, complete,
            or refuse); older outputs without a marker are recognised by any of `legacy` names;
    with `overwrite`, a directory that is another kind of output or not deltakd's at all is
    taken too ('new'); without, it is refused with one line.

    Under --overwrite the caller removes its own files (`remove_own_files`); nothing else in the
    directory is touched."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise DeltakdError(f"--out {directory} exists and is not a directory")
    entries = [name for name in visible_entries(path) if name != MARKER]
    marker = read_marker(path)
    if marker is not None and marker.get("kind") == kind:
        return "ours"
    if marker is None and entries and any((path / name).exists() for name in legacy):
        write_marker(path, kind, [name for name in legacy if (path / name).exists()])
        return "ours"
    if entries and not overwrite:
        what = (
            f"a deltakd {marker.get('kind')} output"
            if marker
            else "files that deltakd did not write"
        )
        raise DeltakdError(
            f"--out {directory} is not empty: it holds {what}, not a {label}; choose a new or "
            "empty directory, or pass --overwrite (which removes only what deltakd wrote there)"
        )
    if marker is not None and overwrite:
        remove_own_files(path, marker.get("files", []))
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    write_marker(path, kind)
    return "new"


def remove_own_files(directory: str | Path, names: Iterable[str]) -> None:
    """Remove the named entries of an output directory (what deltakd wrote), and any
    half-written file it left; everything else stays."""
    path = Path(directory)
    for name in set(names):
        if not name or "/" in name or name in (".", "..", LOCK, MARKER):
            continue
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    for leftover in path.glob(f"*{PARTIAL_SUFFIX}"):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
