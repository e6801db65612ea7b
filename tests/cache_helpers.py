"""Shared by the cache tests: run cache-teachers in-process or as a subprocess."""

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


def run_cli(args: list[str]):
    """The CLI in-process; returns typer's Result (exit_code, output)."""
    return CliRunner().invoke(app, args, catch_exceptions=False)


def run_module(
    args: list[str], env_extra: dict | None = None, **kwargs
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "deltakd_cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, **kwargs,
    )  # fmt: skip
