"""Data-parallel eval under a real `torchrun --nproc_per_node 2` (gloo, CPU): the two ranks
generate alternate batches, and the report and every generation equal those of one process."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def eval_args(tiny, out, *extra) -> list:
    return [
        "eval",
        "--model", tiny.student,
        "--model", tiny.teacher_base,
        "--data", tiny.test,
        "--out", out,
        "--max-new-tokens", 6,
        "--batch-size", 3,  # 8 rows: 3 batches, so the ranks get unequal shares
        "--device", "cpu",
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("protocol", [["--protocol", "greedy"], ["--seeds", "10,20"]])
def test_two_ranks_match_one_process(tiny, tmp_path, protocol):
    single, double = tmp_path / "one" / "report.json", tmp_path / "two" / "report.json"
    result = run_cli(eval_args(tiny, single, *protocol))
    assert result.exit_code == 0, result.output
    launched = torchrun(eval_args(tiny, double, *protocol))
    assert launched.returncode == 0, launched.stderr[-3000:]

    def generations(report_path):
        lines = report_path.with_name("report.generations.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    one, two = generations(single), generations(double)
    assert len(one) == len(two) == 2 * 8 * (1 if "greedy" in protocol else 2)
    assert one == two
    first, second = json.loads(single.read_text()), json.loads(double.read_text())
    assert second["protocol"]["processes"] == 2 and first["protocol"]["processes"] == 1
    for a, b in zip(first["models"], second["models"], strict=True):
        assert a["mean"] == b["mean"] and a["per_seed"] == b["per_seed"]
        assert a["identity"] == b["identity"]
    assert first["differences"] == second["differences"]
