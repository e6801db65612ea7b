"""Deterministic fault injection for the reliability tests (docs/reliability.md).

Every place where deltakd writes something that a kill or a full disk could cut in half calls
`point(name)`. Outside the tests nothing is set and `point` returns at once. With
`DELTAKD_FAULT=ACTION@N` the N-th call in this process acts:

    kill@N     SIGKILL this process (kill -9 at an exact, reproducible place)
    enospc@N   raise OSError(ENOSPC) (a full disk at that write)
    pause@N    sleep 60 s (so a test can start a second process or send SIGINT meanwhile)
    fill@N     fill the file system of the folder $DELTAKD_FAULT_FILL to its last byte, so the
               write that follows meets a real full disk (its library's own error: torch.save's
               RuntimeError, safetensors' SafetensorError, zarr's OSError)

`ACTION@NAME` acts at every point called NAME instead (e.g. `enospc@checkpoint
rng-rank1.pt`). Under torchrun, `DELTAKD_FAULT_RANK=R` lets only rank R act (one rank's full
disk), and `DELTAKD_FAULT_PAUSE_SECONDS` shortens pause@ (default 60).

`DELTAKD_FAULT_TRACE=FILE` appends the name of every point reached, one per line, so a test
knows how many points a run has before it picks where to strike."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path

FAULT_ENV = "DELTAKD_FAULT"
TRACE_ENV = "DELTAKD_FAULT_TRACE"
FILL_ENV = "DELTAKD_FAULT_FILL"
RANK_ENV = "DELTAKD_FAULT_RANK"
PAUSE_ENV = "DELTAKD_FAULT_PAUSE_SECONDS"
FILLER = "deltakd-fault-filler"  # the file fill@N writes (a test deletes it to free the space)
ACTIONS = ("kill", "enospc", "pause", "fill")

_lock = threading.Lock()
_count = 0


def reset() -> None:
    """Start counting from zero again (in-process tests run several commands)."""
    global _count
    with _lock:
        _count = 0


def _parse(spec: str) -> tuple[str, int | str]:
    action, _, where = spec.partition("@")
    if action not in ACTIONS or not where or (where.isdigit() and int(where) < 1):
        raise ValueError(
            f"{FAULT_ENV}={spec!r}: expected one of {ACTIONS} then @N (N >= 1) or @NAME"
        )
    return action, int(where) if where.isdigit() else where


def point(name: str) -> None:
    """A place where a fault may be injected (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV)
    trace = os.environ.get(TRACE_ENV)
    if not spec and not trace:
        return
    global _count
    with _lock:
        _count += 1
        count = _count
        if trace:
            with open(trace, "a", encoding="utf-8") as handle:
                handle.write(f"{name}\n")
    if not spec:
        return
    action, where = _parse(spec)
    if count != where and name != where:
        return
    if os.environ.get(RANK_ENV, os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<injected at {name}>")
    elif action == "fill":
        fill(Path(os.environ[FILL_ENV]))
    else:
        time.sleep(float(os.environ.get(PAUSE_ENV, "60")))


def fill(folder: Path) -> Path:
    """Write FOLDER/FILLER until its file system has no byte left (blocks of 1 MiB down to one
    byte); returns the filler's path."""
    path = folder / FILLER
    with open(path, "ab", buffering=0) as handle:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
            block = bytes(size)
            while True:
                try:
                    if handle.write(block) < size:
                        break
                except OSError as error:
                    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    break
    return path
