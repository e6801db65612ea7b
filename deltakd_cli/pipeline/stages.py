"""A pipeline stage: one deltakd command with its typed options and what it writes, run unless
its output is already complete for the same inputs.

A stage skips when its output is complete and was made from the same inputs: a sidecar
`<output>.stage.json` records the stage's key (its command and options, plus the keys of the
stages and hashes of the files it reads); a changed key clears the output and reruns the stage;
an interrupted stage resumes (cache-teachers by itself, training from its last checkpoint).

Stages run in this process through the runner the CLI hands in (`Runner`: a command name and its
options), or under torchrun as `python -m deltakd_cli COMMAND ARGS` for the data-parallel ones
when --nproc > 1; nothing here imports the CLI.

Each stage's record holds its peak resident memory (`peak_rss_mib`): for a stage run in this
process, the high-water mark of this process during the stage (Linux lets it be reset between
stages: /proc/self/clear_refs); for a torchrun stage, the largest of its processes (os.wait4
returns the launcher's own usage, which covers the workers it waited for)."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import hashlib
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltakd_cli import outputs
from deltakd_cli.console import console, info
from deltakd_cli.errors import DeltakdError
from deltakd_cli.options import record, to_argv
from deltakd_cli.sources import DataSource, file_sha256, fingerprint
from deltakd_cli.train.checkpoint import complete_checkpoints

Runner = Callable[[str, Any], Any]  # (command name, its options) -> runs it in this process


# Stage options that do not change what a stage makes (a pipeline's stages never push): left
# out of its key, so a pipeline made before they existed is not redone.
NOT_IN_KEY = ("push_to_hub", "hub_private")


@dataclass
class Stage:
    """One `deltakd` command of the pipeline and what it writes."""

    name: str
    command: str  # the deltakd command, e.g. "distill"
    options: Any  # that command's options dataclass
    out: Path  # the directory it writes
    complete_file: str  # its presence in `out` means the stage finished
    distributed: bool = False  # may run under torchrun
    resumable: bool = False  # training: pass --resume when a checkpoint exists
    inputs: dict[str, Any] = field(default_factory=dict)  # upstream keys and file hashes

    @property
    def key(self) -> str:
        options = {k: v for k, v in record(self.options).items() if k not in NOT_IN_KEY}
        payload = json.dumps(
            {"command": self.command, "options": options, "inputs": self.inputs},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def argv(self) -> list[str]:
        return [self.command, *to_argv(self.options)]

    @property
    def shown(self) -> str:
        return "deltakd " + shlex.join(self.argv)

    @property
    def sidecar(self) -> Path:
        return self.out.with_name(self.out.name + ".stage.json")

    def is_complete(self) -> bool:
        return (self.out / self.complete_file).is_file()

    def recorded(self) -> dict[str, Any]:
        try:
            return json.loads(self.sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            return {}


def file_key(path: str | Path) -> str | None:
    """The sha256 of a local file (None for a hub id or a directory)."""
    path = Path(path)
    return file_sha256(path) if path.is_file() else None


def data_key(source: DataSource) -> str | None:
    """What identifies a data source's content for a stage key: a local file's or saved
    dataset's sha256; a Hub dataset's name, configuration and split (not downloaded here)."""
    if source.kind == "hub":
        return f"hub:{source.spec}:{source.config}:{source.split}"
    if not source.path.exists():
        return None
    return fingerprint(source)["sha256"]


KIB_PER_MIB = 1024


def reset_peak_rss() -> bool:
    """Reset this process's high-water mark (VmHWM) to its current RSS, so the next reading is
    the peak of what runs after it. False where the kernel does not allow it (not Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_kib() -> int:
    """This process's high-water mark of resident memory, KiB (VmHWM; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def children_peak_rss_kib() -> int:
    """The largest peak RSS of any child process waited for so far (DataLoader workers, ...)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def release_freed_memory() -> None:
    """Hand the memory a finished stage freed back to the system. glibc keeps freed heap memory
    for reuse: after an in-process finetune of a 135M model ~1.5 GiB stayed resident with no
    tensor alive, and every later stage of the demo started on top of it. malloc_trim(0) returns
    it (a no-op where the C library is not glibc)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)


def run_in_process(stage: Stage, options: Any, runner: Runner) -> dict[str, Any]:
    """Run the stage through the runner; its own peak RSS (this process during the stage), and
    that of the child processes it waited for when it raised the children's maximum."""
    children_before = children_peak_rss_kib()
    reset = reset_peak_rss()
    try:
        runner(stage.command, options)
        peak = peak_rss_kib()
    finally:
        release_freed_memory()  # so the next stage starts from what is really in use
    measured: dict[str, Any] = {
        "peak_rss_mib": round(peak / KIB_PER_MIB),
        # without a reset the high-water mark is the process's since it started
        "peak_rss_of": "this stage" if reset else "the process so far",
    }
    children_after = children_peak_rss_kib()
    if children_after > children_before:
        measured["children_peak_rss_mib"] = round(children_after / KIB_PER_MIB)
    return measured


def run_torchrun(argv: list[str], nproc: int) -> dict[str, Any]:
    """Run the stage under torchrun; the peak RSS of its largest process."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "deltakd_cli",
        *argv,
    ]
    # a stage's own output (eval's table) goes where the pipeline's goes: stderr
    launcher = subprocess.Popen(command, stdout=sys.stderr)
    try:
        # wait4, not wait: it returns this child's usage alone (RUSAGE_CHILDREN would be the
        # maximum over every child this process ever waited for)
        _, status, usage = os.wait4(launcher.pid, 0)
    except KeyboardInterrupt:
        launcher.wait()  # torchrun got the same Ctrl-C and stops its workers
        raise
    returncode = os.waitstatus_to_exitcode(status)
    launcher.returncode = returncode
    if returncode == 130:
        raise KeyboardInterrupt
    if returncode != 0:
        raise DeltakdError(f"stage `deltakd {argv[0]}` failed under torchrun (exit {returncode})")
    return {
        "peak_rss_mib": round(usage.ru_maxrss / KIB_PER_MIB),
        "peak_rss_of": f"the largest of torchrun's {nproc} workers and its launcher",
    }


def run_stage(stage: Stage, runner: Runner, nproc: int = 1) -> dict[str, Any]:
    """Run one stage unless its output is complete for the same key; returns its record."""
    key = stage.key
    recorded = stage.recorded()
    same = recorded.get("key") == key
    if same and stage.is_complete():
        info(f"[green]✓ {stage.name}[/green]: done earlier ({stage.out})")
        return {**recorded, "skipped": True}
    if not same:
        if stage.out.exists():
            info(f"{stage.name}: its inputs changed since {stage.out} was made; redoing it")
            shutil.rmtree(stage.out)
        stage.sidecar.parent.mkdir(parents=True, exist_ok=True)
        outputs.atomic_write_text(
            stage.sidecar, json.dumps({"key": key, "done": False}, indent=2) + "\n"
        )
    options = stage.options
    if stage.resumable and same and complete_checkpoints(stage.out):
        options = dataclasses.replace(options, resume=True)
    argv = [stage.command, *to_argv(options)]
    launch_torchrun = stage.distributed and nproc > 1
    prefix = f"torchrun --nproc_per_node {nproc} -m deltakd_cli " if launch_torchrun else ""
    console.rule(f"[bold]{stage.name}")
    info(f"[dim]$ {prefix or 'deltakd '}{shlex.join(argv)}[/dim]")
    started = time.perf_counter()
    if launch_torchrun:
        memory = run_torchrun(argv, nproc)
    else:
        memory = run_in_process(stage, options, runner)
    seconds = time.perf_counter() - started
    if not stage.is_complete():
        raise DeltakdError(
            f"stage {stage.name} ended without writing {stage.out / stage.complete_file}"
        )
    done = {
        "key": key,
        "done": True,
        "command": stage.shown,
        "seconds": round(seconds, 1),
        **memory,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    outputs.atomic_write_text(stage.sidecar, json.dumps(done, indent=2) + "\n")
    info(
        f"[green]✓ {stage.name}[/green]: {seconds:.1f}s, peak RSS {memory['peak_rss_mib']:,} MiB"
        + (
            f" (its worker processes: {memory['children_peak_rss_mib']:,} MiB)"
            if "children_peak_rss_mib" in memory
            else ""
        )
    )
    return {**done, "skipped": False}
