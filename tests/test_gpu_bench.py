"""bench/gpu_bench.py at its scaled-down CPU shape: the code path `make bench-gpu` runs on a GPU
(random Qwen2 models, cache-teachers, distill full and LoRA, generation, the page)."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
from helpers import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


def load_bench():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module("gpu_bench")
    finally:
        sys.path.remove(str(REPO / "bench"))


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_and_writes_the_page(tmp_path):
    gpu_bench = load_bench()
    page = tmp_path / "page.md"
    results = gpu_bench.main(["--cpu-smoke", "--work", str(tmp_path / "work"), "--out", str(page)])
    shape = gpu_bench.CPU_SMOKE
    stages = results["stages"]
    assert list(stages) == [
        "cache-teachers", "distill kd, full", "distill kd, LoRA r=16", "generation (greedy)"
    ]  # fmt: skip
    row_tokens = shape.prompt_tokens + shape.response_tokens + 1
    assert stages["cache-teachers"]["tokens"] == shape.rows * row_tokens
    assert (
        stages["distill kd, full"]["tokens"] == shape.train_steps * shape.train_batch * row_tokens
    )
    assert stages["generation (greedy)"]["tokens"] == shape.prompts * shape.new_tokens
    assert all(
        stage["tokens_per_s"] > 0 and stage["peak_memory_mib"] > 0 for stage in stages.values()
    )
    assert all(stage["mfu"] is None for stage in stages.values())  # no peak known for a CPU
    text = page.read_text()
    assert "| distill kd, LoRA r=16 |" in text and "unknown (no MFU)" in text
    assert json.loads(page.with_suffix(".json").read_text())["device"] == "cpu"


def test_mfu_uses_the_dense_bf16_peak_of_known_devices():
    gpu_bench = load_bench()
    assert gpu_bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_bench.peak_tflops("NVIDIA L40S") == 362.0
    assert gpu_bench.peak_tflops("NVIDIA L4") == 121.0
    assert gpu_bench.peak_tflops("Some Other GPU") is None
    # 6N FLOP per token at 1e4 tokens/s for N = 0.5e9 against 989 TFLOP/s
    assert gpu_bench.utilisation(6 * 0.5e9, 1e4, 989.0) == pytest.approx(3e13 / 989e12)


def test_the_configurations_are_qwen25s():
    from transformers import Qwen2Config

    from deltakd_cli import memory

    gpu_bench = load_bench()
    student = memory.shape_of_config(Qwen2Config(**gpu_bench.QWEN25_05B))
    teacher = memory.shape_of_config(Qwen2Config(**gpu_bench.QWEN25_15B))
    assert student.parameters == 494_032_768  # Qwen2.5-0.5B as published
    assert teacher.parameters == 1_543_714_304  # Qwen2.5-1.5B as published
