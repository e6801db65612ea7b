"""torchrun helpers: rank, world size, barriers, so no other module branches on the env.

torch is imported only where a process group is started or a device chosen: the console and
the trackers ask for the rank while the CLI is still reading its arguments."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from deltakd_cli.errors import DeltakdError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def _dist() -> Any:
    """torch.distributed if something imported it; a process group needs it, so without it
    there is none."""
    return sys.modules.get("torch.distributed")


def is_distributed() -> bool:
    dist = _dist()
    return dist is not None and dist.is_available() and dist.is_initialized()


def rank() -> int:
    if is_distributed():
        return _dist().get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if is_distributed():
        return _dist().get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes torchrun started on this host (1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


# The process-group timeout: how long a rank waits at a collective for the others before
# giving up. Each stage's default (minutes) suits its longest legitimate wait: a cache's ranks
# meet after whole shards, an eval's after each model's generations, a training run's at every
# step (rank 0 alone writes a checkpoint meanwhile). option_groups.DistributedOptions sets it.
DEFAULT_TIMEOUT_MINUTES = 60.0
WAIT_NOTICE_ENV = "DELTAKD_WAIT_NOTICE_SECONDS"  # how often a waiting rank says so (tests: 1)
WAIT_NOTICE_SECONDS = 60.0
FAILED_KEY = "deltakd/failed/"  # + rank: that rank's one line, set as it stops
FAILURES_KEY = "deltakd/failures"  # how many ranks have failed (one key for peers to poll)
ARRIVED_KEY = "deltakd/arrived/"  # + rank: how many named collectives it has reached
# Texts of torch.distributed's errors when a peer went away (gloo, nccl, the store).
PEER_LOST = (
    "Connection closed by peer", "Connection reset by peer", "gloo/transport",
    "NCCL communicator was aborted", "ProcessGroupNCCL", "ProcessGroupGloo",
)  # fmt: skip

_store: Any = None  # the process group's store (kept: it outlives destroy_process_group)
_arrived = 0  # named collectives this rank has reached
_timeout_minutes = DEFAULT_TIMEOUT_MINUTES


class RankFailed(DeltakdError):
    """Another rank stopped (its own line, above, says why): this one stops with it."""


class WaitTimedOut(DeltakdError):
    """This rank waited --dist-timeout minutes at a collective for another one."""


def set_timeout(minutes: float) -> None:
    """The timeout of the process group `init` starts next (a command's --dist-timeout)."""
    global _timeout_minutes
    _timeout_minutes = minutes


def init(device: torch.device, timeout_minutes: float | None = None) -> None:
    """Start the process group when launched by torchrun: nccl on CUDA, gloo on CPU. A rank
    waits `timeout_minutes` (default: `set_timeout`'s) at a collective for the others before
    stopping."""
    global _store, _timeout_minutes, _arrived
    if not launched_by_torchrun() or is_distributed():
        return
    if timeout_minutes is None:
        timeout_minutes = _timeout_minutes
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    _timeout_minutes, _arrived = timeout_minutes, 0
    try:  # private in torch, stable since 1.x; without it failures are named less exactly
        _store = dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        _store = None
    _stop_on_sigterm()


def _stop_on_sigterm() -> None:
    """Under torchrun a SIGTERM is torchrun stopping this worker (another one exited, or the
    launcher was stopped): end with one line, as Ctrl-C does, instead of dying in silence. The
    handler raises in this process only (a forked DataLoader worker dies as before), and once
    (a second SIGTERM ends the process at once)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    owner = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if os.getpid() != owner:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if failed_peer() is not None:
            raise peer_stopped()
        raise RankFailed(
            "stopped: torchrun stopped this process (SIGTERM: its launcher was stopped, or "
            "another rank failed; see the lines above)"
        )

    signal.signal(signal.SIGTERM, stop)


# ----------------------------------------------------------------------------- failing cleanly
#
# A rank that stops with an error sets its one line in the group's store (`announce_failure`)
# before its process group goes. Its peers learn of it where they wait: at a named collective
# they poll the store (and the collective), so every rank stops with one line naming the rank
# that failed and why, never a backend traceback ("Connection closed by peer").


def _store_get(key: str) -> str | None:
    if _store is None:
        return None
    try:
        if not _store.check([key]):
            return None
        return _store.get(key).decode("utf-8", "replace")
    except Exception:  # the store went away with the launcher: nothing more to learn
        return None


def announce_failure(message: str) -> None:
    """Tell the other ranks that this one stops, and why (one line)."""
    if _store is None or world_size() < 2:
        return
    try:
        _store.set(f"{FAILED_KEY}{rank()}", message)
        _store.add(FAILURES_KEY, 1)
    except Exception:
        pass


def failed_peer() -> tuple[int, str] | None:
    """The first other rank that announced a failure, with its line; None if none did. One
    store request while none has (a count), so a thousand waiting ranks cost the store little."""
    if _store is None:
        return None
    try:
        if int(_store.add(FAILURES_KEY, 0)) == 0:
            return None
    except Exception:
        return None
    for other in range(world_size()):
        if other != rank():
            message = _store_get(f"{FAILED_KEY}{other}")
            if message is not None:
                return other, message
    return None


STOPPED_KEY = "deltakd/stopped/"  # + rank: that rank has printed its last line
PEERS_GRACE_SECONDS = 10.0  # how long a failed rank waits for its peers' lines before exiting


def stopped(wait_for_peers: bool = False) -> None:
    """(Under torchrun, as a rank ends with an error line.) Say so in the store; the rank that
    failed first waits up to PEERS_GRACE_SECONDS for the others to print theirs: torchrun
    stops every worker (SIGTERM) as soon as one exits, which would cut their lines off."""
    if _store is None or world_size() < 2:
        return
    try:
        _store.set(f"{STOPPED_KEY}{rank()}", "1")
        if not wait_for_peers:
            return
        keys = [f"{STOPPED_KEY}{other}" for other in range(world_size()) if other != rank()]
        deadline = time.monotonic() + PEERS_GRACE_SECONDS
        while time.monotonic() < deadline and not _store.check(keys):
            time.sleep(0.05)
    except Exception:  # the store went away: nobody is left to wait for
        pass


def peer_stopped() -> RankFailed:
    """The one line of a rank whose peer stopped: which rank, and its reason when known."""
    failed = failed_peer()
    if failed is None:
        return RankFailed("stopped: another rank failed; see its line above")
    other, message = failed
    return RankFailed(f"stopped: rank {other} failed ({message}); see its line above")


def is_peer_lost(error: BaseException) -> bool:
    """Whether `error` is torch.distributed's word that a peer went away (or timed out)."""
    names = {klass.__name__ for klass in type(error).__mro__}
    if names & {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}:
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in PEER_LOST)


def _failure_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror + (f" at {error.filename}" if error.filename else "")
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, DeltakdError) else f"{type(error).__name__}: {text}"[:300]


def _late_ranks() -> list[int]:
    """The ranks that have not reached the collective this rank waits at."""
    late = []
    for other in range(world_size()):
        if other == rank() or _store is None:
            continue
        try:
            if int(_store.add(f"{ARRIVED_KEY}{other}", 0)) < _arrived:
                late.append(other)
        except Exception:
            return []
    return late


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def notice_seconds() -> float:
    return float(os.environ.get(WAIT_NOTICE_ENV, WAIT_NOTICE_SECONDS))


def _wait(work: Any, where: str) -> None:
    """Wait for an async collective, polling: a peer's announced failure or a lost peer stops
    this rank with one line (`peer_stopped`); past a minute it says once a minute whom it waits
    for ("waiting for rank 1 at the checkpoint barrier for 2 min")."""
    started = time.monotonic()
    every = notice_seconds()
    next_notice, next_check, pause = started + every, started + 1.0, 0.0002
    while True:
        try:
            if work.is_completed():
                work.wait()
                return
        except Exception as error:
            if "timed out" in str(error).lower():
                who = ", ".join(f"rank {r}" for r in _late_ranks()) or "another rank"
                raise WaitTimedOut(
                    f"stopped: waited {_timeout_minutes:g} min for {who} at {where} "
                    "(--dist-timeout)"
                ) from None
            if not is_peer_lost(error):
                raise
            raise peer_stopped() from None
        now = time.monotonic()
        if now >= next_check:
            if failed_peer() is not None:
                raise peer_stopped()
            next_check = now + 1.0
        if now >= next_notice:
            late = _late_ranks()
            who = ", ".join(f"rank {r}" for r in late) or "another rank"
            print(
                f"[rank {rank()}] waiting for {who} at {where} for {_duration(now - started)}",
                file=sys.stderr,
                flush=True,
            )
            next_notice += every
        time.sleep(pause)
        pause = min(pause * 2, 0.005)  # a step's wait is overshot by 5 ms at most


def _arrive() -> None:
    global _arrived
    _arrived += 1
    if _store is not None:
        try:
            _store.add(f"{ARRIVED_KEY}{rank()}", 1)
        except Exception:
            pass


def barrier(where: str = "a barrier") -> None:
    """Every rank meets here (`where` names the place in the waiting notice)."""
    if is_distributed():
        _arrive()
        _wait(_dist().barrier(async_op=True), where)


def all_reduce_sum(value: torch.Tensor, where: str = "a training step") -> torch.Tensor:
    """Sum a tensor over ranks (in place) and return it; a no-op in one process."""
    if is_distributed():
        _arrive()
        _wait(_dist().all_reduce(value, op=_dist().ReduceOp.SUM, async_op=True), where)
    return value


def all_gather_objects(obj: object, where: str = "a gather") -> list:
    """Every rank's `obj`, in rank order; `[obj]` in one process. The ranks meet first (a
    polled barrier), so the object collective itself never waits long."""
    if not is_distributed():
        return [obj]
    barrier(where)
    gathered: list = [None] * world_size()
    _dist().all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: object, where: str = "a broadcast from rank 0") -> object:
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    barrier(where)
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def on_main_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give its result to every rank. A DeltakdError it raises is
    raised on every rank, so no rank is left waiting for one that stopped."""
    outcome: tuple[str, Any] | None = None
    if is_main_process():
        try:
            outcome = ("ok", fn())
        except DeltakdError as error:
            outcome = ("error", str(error))
    outcome = broadcast_object(outcome, "rank 0's check")
    if outcome[0] == "error":
        raise DeltakdError(outcome[1])
    return outcome[1]


def shutdown(clean: bool = True) -> None:
    """End the process group. After a run that ended well every rank first meets at a barrier:
    a rank that tears the group down while a peer is still finishing the last collective leaves
    that peer aborting ("terminate called without an active exception") or hanging. After an
    error there is no barrier, since a peer that stopped elsewhere would never reach it."""
    if not is_distributed():
        return
    if clean:
        barrier("the end")
    else:
        _announce_current_error()
    _dist().destroy_process_group()


def _announce_current_error() -> None:
    """(Called from a `finally` while an error stops this rank.) Announce it to the peers
    before the group goes, unless it is a peer's failure, a lost peer or Ctrl-C (every rank
    gets that one itself)."""
    error = sys.exc_info()[1]
    if error is None or isinstance(error, (RankFailed, KeyboardInterrupt)):
        return
    if type(error).__name__ == "Interrupted" or is_peer_lost(error):
        return
    if failed_peer() is not None:  # a peer stopped first: this error is likely its wake
        return
    announce_failure(_failure_line(error))


def device_for(requested: str) -> torch.device:
    """`auto` picks this rank's GPU when there is one, else the CPU."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank())
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank())
    return device
