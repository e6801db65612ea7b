"""torchrun helpers: rank, world size, barriers, so no other module branches on the env.

torch is imported only where a process group is started or a device chosen: the console and
the trackers ask for the rank while the CLI is still reading its arguments."""

from __future__ import annotations

import os
import sys
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


def init(device: torch.device) -> None:
    """Start the process group when launched by torchrun: nccl on CUDA, gloo on CPU."""
    if not launched_by_torchrun() or is_distributed():
        return
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))


def barrier() -> None:
    if is_distributed():
        _dist().barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place) and return it; a no-op in one process."""
    if is_distributed():
        _dist().all_reduce(value, op=_dist().ReduceOp.SUM)
    return value


def all_gather_objects(obj: object) -> list:
    """Every rank's `obj`, in rank order; `[obj]` in one process."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * world_size()
    _dist().all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
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
    outcome = broadcast_object(outcome)
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
        _dist().barrier()
    _dist().destroy_process_group()


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
