"""Shared by the tests: run the CLI in-process or as a subprocess, check its one-line errors,
and build cache-teachers command lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from deltakd_cli.cli import app

REPO = Path(__file__).resolve().parents[1]


def cache_args(tiny, out, *extra, student=True) -> list[str]:
    args = [
        "cache-teachers",
        "--teacher-base", str(tiny.teacher_base),
        "--teacher-tuned", str(tiny.teacher_tuned),
        "--data", str(tiny.train),
        "--out", str(out),
        "--device", "cpu",
    ]  # fmt: skip
    if student:
        args += ["--student", str(tiny.student)]
    return args + [str(a) for a in extra]


def train_and_held_out_caches(tiny, root: Path, top_k: int = 8) -> tuple[Path, Path]:
    """A cache of the fixture's train rows and one of its test rows (a held-out cache), built
    the same way (teachers, student, k)."""
    train, held_out = root / "train-cache", root / "heldout-cache"
    result = run_cli(cache_args(tiny, train, "--top-k", top_k))
    assert result.exit_code == 0, result.output
    args = cache_args(tiny, held_out, "--top-k", top_k)
    args[args.index("--data") + 1] = str(tiny.test)
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    return train, held_out


def run_cli(args: list):
    """The CLI in-process; returns typer's Result (exit_code, output)."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def assert_one_line_error(result, *fragments) -> None:
    """Bad input: exit 2, exactly one `error:` line, no traceback, and these words in it."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    joined = flat(result.output)
    for fragment in fragments:
        assert fragment in joined, result.output


def run_module(
    args: list[str], env_extra: dict | None = None, **kwargs
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "deltakd_cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, **kwargs,
    )  # fmt: skip


def torchrun(args: list, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m deltakd_cli ARGS` (gloo on CPU)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc), "-m", "deltakd_cli", *[str(a) for a in args],
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def greedy_protocol(max_new_tokens: int = 8, batch_size: int = 8):
    """A quick deterministic eval protocol for the tiny models."""
    from deltakd_cli.evaluate.protocol import make_protocol

    return make_protocol(
        "greedy", max_new_tokens=max_new_tokens, batch_size=batch_size, template="plain"
    )
