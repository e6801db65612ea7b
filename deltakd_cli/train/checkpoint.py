"""The checkpoint layout, owned here (docs/training.md): tensors and plain data only.

    OUT/checkpoints/step-N/
      model.pt        the student's full state dict (tensors; gathered under FSDP2)
      optimizer.pt    AdamW state (full, unsharded; tensors and numbers)
      trainer.json    the LR scheduler state
      rng-rankR.pt    every RNG's state of rank R, as tensors
      state.json      step, epoch, step within the epoch, total steps, the options that matter

A checkpoint is written under `.step-N.partial/` and renamed to `step-N/` when complete, so a
partial one never matches `complete_checkpoints`. The .pt files are read back with
`torch.load(weights_only=True)`: a checkpoint is data, never code."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deltakd_cli import __version__, distributed, faults, outputs
from deltakd_cli.errors import DeltakdError
from deltakd_cli.train.options import OPTION_NAMES, OPTIONS_ADDED_LATER, OPTIONS_THAT_MATTER

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first. Partial ones live under a dotted
    temp name until renamed, so they never match."""
    directory = out / "checkpoints"
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def logged_losses(metrics_path: Path) -> dict[int, float]:
    """step -> training loss of every line of a run's metrics.jsonl (NaN logged as null)."""
    found: dict[int, float] = {}
    if not metrics_path.is_file():
        return found
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record and "loss" in record:
            loss = record["loss"]
            found[int(record["step"])] = float(loss) if loss is not None else float("nan")
    return found


def last_sound_checkpoint(out: Path) -> tuple[int, Path, float] | None:
    """(step, dir, largest |weight|) of the newest complete checkpoint whose weights are all
    finite and whose last logged loss at or before it is finite; None if there is none."""
    losses = logged_losses(out / "metrics.jsonl")
    for step, path in reversed(complete_checkpoints(out)):
        before = [losses[s] for s in sorted(losses) if s <= step]
        if before and not math.isfinite(before[-1]):
            continue
        weights = load_tensors(path / "model.pt")
        largest = max(
            (float(t.abs().max()) for t in weights.values() if t.is_floating_point() and t.numel()),
            default=0.0,
        )
        if math.isfinite(largest):
            return step, path, largest
    return None


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and numbers only (a checkpoint holds no Python objects)."""
    _, numpy_key, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_state, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(numpy_key.astype(np.int64)),
        "numpy_pos": int(numpy_pos),
        "numpy_has_gauss": int(numpy_has_gauss),
        "numpy_gauss": float(numpy_gauss),
        "python_version": int(python_version),
        "python_state": torch.tensor(python_state, dtype=torch.int64),
        "python_gauss": python_gauss,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_key = state["numpy_key"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", numpy_key, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"])
    )
    python_state = tuple(int(v) for v in state["python_state"].tolist())
    random.setstate((state["python_version"], python_state, state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_tensors(path: Path) -> Any:
    """A checkpoint file as data: torch.load with weights_only=True, which refuses anything but
    tensors, numbers, strings and containers of them (a pickle that would run code is refused,
    never run)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DeltakdError(f"checkpoint file missing: {path}") from None
    except Exception as error:  # UnpicklingError and friends: not plain data
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DeltakdError(
            f"{path}: not a plain-data checkpoint (refused, nothing in it was run): {first}"
        ) from None


def save_tensors(value: Any, path: Path) -> None:
    faults.point(f"checkpoint {path.name}")
    torch.save(value, path)


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: what a checkpoint file needs on disk."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


# ----------------------------------------------------------------------------- full state


def model_state(module: nn.Module, student: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The student's full state dict on CPU (gathered from the shards under FSDP2)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(
            module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return {k[len("student.") :]: v for k, v in full.items() if k.startswith("student.")}
    return {k: v.detach().cpu() for k, v in student.state_dict().items()}


def load_model_state(
    module: nn.Module, student: nn.Module, fsdp: bool, state: dict[str, torch.Tensor]
) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(
            module,
            {f"student.{k}": v for k, v in state.items()},
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
    else:
        student.load_state_dict(state)


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(
            module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool, state: dict
) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            module, optimizer, state, options=StateDictOptions(full_state_dict=True)
        )
    else:
        optimizer.load_state_dict(state)


# ----------------------------------------------------------------------------- write, read


def write_checkpoint(
    out: Path,
    step: int,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    position: dict[str, Any],
    keep: int,
) -> Path:
    """Write OUT/checkpoints/step-N (every rank calls it: each writes its RNG state, rank 0 the
    rest) and keep the last `keep` checkpoints (0: all)."""
    rank = distributed.rank()
    final = out / "checkpoints" / f"step-{step}"
    partial = out / "checkpoints" / f".step-{step}.partial"
    needed = 2 * state_bytes(model) + state_bytes(optimizer)
    where = "the checkpoint barrier"
    try:
        with outputs.writing(final, needed, discard=partial if rank == 0 else None):
            if rank == 0:
                if partial.exists():
                    shutil.rmtree(partial)
                partial.mkdir(parents=True)
            distributed.barrier(where)
            save_tensors(_rng_state(), partial / f"rng-rank{rank}.pt")
            if rank == 0:
                save_tensors(model, partial / "model.pt")
                save_tensors(optimizer, partial / "optimizer.pt")
                outputs.atomic_write_text(
                    partial / "trainer.json", json.dumps({"scheduler": scheduler})
                )
            distributed.barrier(where)
            if rank == 0:
                state = {"step": step, **position, "version": __version__}
                outputs.atomic_write_text(partial / "state.json", json.dumps(state, indent=2))
                faults.point("checkpoint rename")
                partial.rename(final)
                if keep:
                    for _, old in complete_checkpoints(out)[:-keep]:
                        shutil.rmtree(old, ignore_errors=True)
    except (distributed.RankFailed, distributed.WaitTimedOut):  # no half-written checkpoint
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    distributed.barrier(where)
    return final


BEST_DIR = "best"  # OUT/checkpoints/best: the weights of the lowest held-out loss (--keep-best)


def write_best(out: Path, step: int, model: dict[str, torch.Tensor], eval_loss: float) -> None:
    """(rank 0) Replace OUT/checkpoints/best with these weights; the new one is complete before
    the old one goes."""
    final = out / "checkpoints" / BEST_DIR
    partial = out / "checkpoints" / f".{BEST_DIR}.partial"
    with outputs.writing(final, 2 * state_bytes(model), discard=partial):
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        save_tensors(model, partial / "model.pt")
        record = {"step": step, "eval_loss": eval_loss, "version": __version__}
        outputs.atomic_write_text(partial / "best.json", json.dumps(record, indent=2))
        old = out / "checkpoints" / f".{BEST_DIR}.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        partial.rename(final)
        shutil.rmtree(old, ignore_errors=True)


def read_best(out: Path, through_step: int | None = None) -> dict[str, Any] | None:
    """The best weights' record ({"step", "eval_loss"}), or None when there are none (or, with
    `through_step`, when they come from a step after it: a resume goes back to its checkpoint)."""
    found = out / "checkpoints" / BEST_DIR / "best.json"
    if not found.is_file():
        return None
    record = json.loads(found.read_text())
    if through_step is not None and record["step"] > through_step:
        return None
    return record


def best_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_tensors(out / "checkpoints" / BEST_DIR / "model.pt")


@dataclass
class Checkpoint:
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]


def read_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint's states (this rank's RNG state is restored on the way)."""
    state = json.loads((path / "state.json").read_text())
    trainer_file = path / "trainer.json"
    if not trainer_file.is_file():
        raise DeltakdError(
            f"{path} was written by an older deltakd (no trainer.json) and cannot be "
            "resumed; start a new --out"
        )
    checkpoint = Checkpoint(
        step=int(state["step"]),
        model=load_tensors(path / "model.pt"),
        optimizer=load_tensors(path / "optimizer.pt"),
        scheduler=json.loads(trainer_file.read_text())["scheduler"],
    )
    rng_file = path / f"rng-rank{distributed.rank()}.pt"
    if rng_file.exists():
        _set_rng_state(load_tensors(rng_file))
    return checkpoint


def saved_total_steps(path: Path) -> int | None:
    """The total steps of the run that wrote the checkpoint (its schedule's length)."""
    return json.loads((path / "state.json").read_text()).get("total_steps")


def saved_options(path: Path) -> dict[str, Any]:
    """The options that matter, as the checkpoint recorded them."""
    return json.loads((path / "state.json").read_text())["options"]


# ----------------------------------------------------------------------------- resume


# Options a resume may change, each in one direction only: training further.
EXTENDABLE = ("max_steps", "epochs")


def check_resumable(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Refuse, in one line, to resume from the checkpoint at `path` when an option that matters
    (OPTIONS_THAT_MATTER; `identity` holds this run's values) differs from what it recorded.
    Two changes are allowed, and returned (for a note and run.json): a larger --max-steps or
    --epochs (the run trains further: {"extended": {name: [was, now]}}), and a cache at another
    path with the same manifest checksum, or a finetune data file with the same sha256 (moved or
    copied: {"cache_moved": [was, now]} or {"data_moved": [...]})."""
    saved = saved_options(path)
    allowed: dict[str, Any] = {}
    for name in OPTIONS_THAT_MATTER:
        was = saved.get(name, OPTIONS_ADDED_LATER.get(name))
        now = identity[name]
        if was == now:
            continue
        moved = _moved_input(name, was, now)
        if moved is not None:
            allowed[f"{moved}_moved"] = [was[moved], now[moved]]
            continue
        if _trains_further(name, was, now, saved, identity):
            allowed.setdefault("extended", {})[name] = [was, now]
            continue
        raise DeltakdError(_resume_mismatch(name, path, was, identity))
    return allowed


# An input is its content: a cache by its manifest checksum, a finetune data file by its sha256.
CONTENT_OF = {"cache": "manifest_sha256", "data": "data_sha256"}


def _moved_input(name: str, was: Any, now: Any) -> str | None:
    """The input ("cache" or "data") that `now` names at another path with the same content
    (moved or copied), everything else about the source unchanged; None if none."""
    if name != "source" or not isinstance(was, dict) or not isinstance(now, dict):
        return None
    for key, content in CONTENT_OF.items():
        same_content = bool(now.get(content)) and was.get(content) == now.get(content)
        rest_same = {k: v for k, v in was.items() if k != key} == {
            k: v for k, v in now.items() if k != key
        }
        if key in now and was.get(key) != now.get(key) and same_content and rest_same:
            return key
    return None


def _trains_further(
    name: str, was: Any, now: Any, saved: dict[str, Any], identity: dict[str, Any]
) -> bool:
    """A larger --max-steps (both set), or more --epochs while --max-steps stays 0."""
    if name not in EXTENDABLE or not isinstance(was, int) or not isinstance(now, int):
        return False
    if name == "epochs" and (saved.get("max_steps") or identity.get("max_steps")):
        return False
    if name == "max_steps" and not was:
        return False
    return now > was


def _resume_mismatch(name: str, path: Path, was: Any, identity: dict[str, Any]) -> str:
    now = identity[name]
    if name == "source" and isinstance(was, dict) and isinstance(now, dict):
        if "manifest_sha256" in now:
            return (
                f"--resume: the cache {now['cache']} is not the one {path.name} trained on (its "
                "manifest checksum differs: another cache, or this one rebuilt); resume needs "
                "the same cache (it may have moved), or start a new --out"
            )
        if "data_sha256" in now and was.get("data") == now.get("data"):
            if was.get("data_sha256") != now.get("data_sha256"):
                return (
                    f"--resume: the data file {now['data']} changed since {path.name} (its "
                    "sha256 differs); resume needs the same data, or start a new --out"
                )
    if name == "lora_r" and not (was and now):
        if was:
            return (
                f"--resume: {path.name} is of a LoRA run (--lora-r {was}); resume it with the "
                "same --lora-* options, or start a new --out"
            )
        return (
            f"--resume: {path.name} is of a run that trained every weight (no --lora-r); resume "
            f"it without --lora-r {now}, or start a new --out"
        )
    flag = OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
    return (
        f"--resume: {flag} changed since {path.name} (was {was!r}, now {now!r}); resume with "
        "the same options or start a new --out"
    )
