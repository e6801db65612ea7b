"""Data parallel training under a real `torchrun --nproc_per_node 2` (gloo, CPU): 2 ranks x 1
micro-batch must match 1 process x 2 accumulated micro-batches; FSDP2 likewise, and it resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli, torchrun
from safetensors.torch import load_file

from deltakd_cli.outputs import MARKER

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def caches(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-caches")
    made = {}
    for name, with_student in (("student", True), ("teachers", False)):
        args = [
            "cache-teachers",
            "--teacher-base", tiny.teacher_base,
            "--teacher-tuned", tiny.teacher_tuned,
            "--data", tiny.train,
            "--out", root / name,
            "--top-k", 8,
            "--device", "cpu",
        ]  # fmt: skip
        if with_student:
            args += ["--student", tiny.student]
        result = run_cli(args)
        assert result.exit_code == 0, result.output
        made[name] = root / name
    return made


def distill_args(tiny, cache, out, *extra) -> list:
    return [
        "distill",
        "--cache", cache,
        "--student", tiny.student,
        "--out", out,
        "--objective", "delta",
        "--sft-weight", 0.3,
        "--lr", "5e-3",
        "--batch-size", 3,
        "--max-steps", 5,
        "--device", "cpu",
        *extra,
    ]  # fmt: skip


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=0, atol=atol)


def losses_of(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_match_one_process_with_accumulation(tiny, caches, tmp_path):
    """Same global batch: 2 ranks x --grad-accum 1 against 1 process x --grad-accum 2 (the
    ranks read with 2 DataLoader workers each, the reference inline)."""
    two = tmp_path / "ddp"
    process = torchrun(distill_args(tiny, caches["student"], two, "--num-workers", 2))
    assert process.returncode == 0, process.stderr[-3000:]
    one = tmp_path / "single"
    result = run_cli(
        distill_args(tiny, caches["student"], one, "--grad-accum", 2, "--num-workers", 0)
    )
    assert result.exit_code == 0, result.output
    assert json.loads((two / "run.json").read_text())["resolved"]["world_size"] == 2
    assert_same_weights(two, one, atol=1e-6)
    assert losses_of(two) == pytest.approx(losses_of(one), rel=1e-5)
    before = load_file(Path(tiny.student) / "model.safetensors")
    after = load_file(two / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it did train


def test_fsdp2_matches_one_process_and_resumes(tiny, caches, tmp_path):
    """FSDP2 over 2 ranks, with the frozen S0 also sharded (teachers-only cache): same result as
    one process, and a run resumed from its checkpoint ends at the same weights."""
    sharded = tmp_path / "fsdp"
    extra = ("--fsdp", "--num-workers", 0, "--save-every", 2, "--keep-checkpoints", 0)
    process = torchrun(distill_args(tiny, caches["teachers"], sharded, *extra))
    assert process.returncode == 0, process.stderr[-3000:]
    run = json.loads((sharded / "run.json").read_text())
    assert run["resolved"]["frozen_student"] is True and run["options"]["fsdp"] is True
    one = tmp_path / "single"
    result = run_cli(
        distill_args(tiny, caches["teachers"], one, "--grad-accum", 2, "--num-workers", 0)
    )
    assert result.exit_code == 0, result.output
    assert_same_weights(sharded, one, atol=1e-6)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(sharded / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    # the run's own marker comes along: deltakd resumes only into a folder it proves it made
    shutil.copy(sharded / MARKER, resumed / MARKER)
    process = torchrun(distill_args(tiny, caches["teachers"], resumed, *extra, "--resume"))
    assert process.returncode == 0, process.stderr[-3000:]
    assert "resuming from" in process.stderr + process.stdout
    assert_same_weights(resumed, sharded, atol=1e-7)
