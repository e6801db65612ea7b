"""The memory estimate (memory.py): its arithmetic against hand computation, the parameter count
of a real configuration, and the one-line refusal before anything is loaded."""

from __future__ import annotations

import pytest
from helpers import assert_one_line_error, cache_args, flat, run_cli

from deltakd_cli import memory

# Qwen2.5-0.5B's configuration (config.json of the Hub model): 494,032,768 parameters as
# published ("0.49B"), its output layer tied to the embeddings.
QWEN25_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}

SMALL = memory.ModelShape(
    parameters=1000, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
    num_kv_heads=1, head_dim=4, vocab_size=50,
)  # fmt: skip


def test_the_llama_formula_counts_qwen25_05b_by_hand():
    from transformers import Qwen2Config

    config = Qwen2Config(**QWEN25_05B)
    shape = memory.shape_of_config(config)
    hidden, kv = 896, 2 * 64  # two key/value heads of 896 / 14 = 64
    attention = hidden * hidden + 2 * hidden * kv + hidden * hidden + (hidden + 2 * kv)  # biases
    mlp = 3 * hidden * 4864
    by_hand = 151936 * hidden + 24 * (attention + mlp + 2 * hidden) + hidden
    assert shape.parameters == by_hand == 494_032_768
    assert memory.meta_parameters(config) == by_hand  # what transformers builds from it


def test_training_estimate_arithmetic_by_hand():
    full = memory.training_estimate(SMALL, micro_batch_tokens=10, logit_chunk_positions=4)
    per_layer = 6 * 8 + 2 * 4 + 4 * 16  # 6 H + 2 KV + 4 I values per token
    assert full.parts == {
        "weights": 1000 * 4,
        "gradients and AdamW state": 1000 * 12,
        "activations": 10 * (2 * per_layer + 8) * 4,
        "logits chunk": 4 * 50 * 4 * 5,  # 4 positions x 50 ids x float32 x 5 blocks
    }
    checkpointed = memory.training_estimate(
        SMALL, micro_batch_tokens=10, logit_chunk_positions=4, checkpointed=True
    )
    assert checkpointed.parts["activations"] == 10 * (2 * 8 + per_layer + 8) * 4

    lora = memory.lora_parameters(SMALL, 2, ["q_proj", "v_proj"])
    assert lora == 2 * (2 * (8 + 8) + 2 * (8 + 4))  # two layers: q is 8 -> 8, v is 8 -> 4
    adapted = memory.training_estimate(
        SMALL, micro_batch_tokens=10, logit_chunk_positions=4, lora_trainable=lora
    )
    assert adapted.parts["weights"] == 1000 * 4 + lora * 4
    assert adapted.parts["gradients and AdamW state"] == lora * 12

    sharded = memory.training_estimate(
        SMALL, micro_batch_tokens=10, logit_chunk_positions=4, compute_bytes=2, shards=4
    )
    assert sharded.parts["weights"] == (1000 * 4 + 1000 * 2) // 4  # + autocast's bf16 copies
    assert sharded.parts["gradients and AdamW state"] == 1000 * 12 // 4


def test_inference_estimate_counts_each_model_once_and_the_log_probs_chunk():
    estimate = memory.inference_estimate(
        [SMALL, SMALL], batch_tokens=6, position_chunk=1024, weight_bytes=2, roles=3
    )
    assert estimate.parts == {
        "weights": 2 * 1000 * 2,
        "activations": (6 * (4 * 8 + 2 * 16) + 2 * 6 * 8) * 2,
        "log-probs chunk": 6 * 50 * 4 * (3 + 3),
    }


def test_fitting_names_the_mildest_change_of_each_kind():
    small, large = memory.Estimate({"x": 10}), memory.Estimate({"x": 100})
    groups = [[("--batch-size 4", large), ("--batch-size 2", small), ("--batch-size 1", small)]]
    groups.append([("--lora-r 16", large)])
    assert memory.fitting(groups, 50) == ["--batch-size 2 (about 0 MiB)"]


def test_available_ram_is_read_from_meminfo(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   1048576 kB\n")
    assert memory.cpu_available_bytes(str(meminfo)) == 2**30
    monkeypatch.setenv(memory.LIMIT_VARIABLE, "0.5")
    assert memory.limit_override() == 2**29


def test_cache_teachers_prints_its_estimate_and_refuses_in_one_line(tiny, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    monkeypatch.setenv(memory.LIMIT_VARIABLE, "0.0001")  # ~100 KiB: nothing fits
    refused = run_cli(cache_args(tiny, out))
    assert_one_line_error(
        refused, "cache-teachers needs about", "but DELTAKD_MEMORY_LIMIT_GB allows 0 MiB",
        "use a smaller model or a larger device",
    )  # fmt: skip
    assert not out.exists()  # refused before anything was loaded or written

    monkeypatch.delenv(memory.LIMIT_VARIABLE)
    fits = run_cli(cache_args(tiny, out))
    assert fits.exit_code == 0, fits.output
    assert "memory: cache-teachers needs about" in flat(fits.output)


@pytest.mark.usefixtures("one_thread")
def test_finetune_refusal_names_what_would_fit(tiny, tmp_path, monkeypatch):
    args = ["finetune", "--model", tiny.student, "--data", tiny.train, "--out", tmp_path / "out",
            "--batch-size", 64, "--max-length", 256, "--device", "cpu"]  # fmt: skip
    monkeypatch.setenv(memory.LIMIT_VARIABLE, "1")
    assert "memory: finetune needs about" in flat(run_cli([*args, "--max-steps", 1]).output)
    # 2 MiB: under this run's estimate (64 rows padded to the longest, ~10 MiB of logits
    # chunks alone) but above that of a few rows
    monkeypatch.setenv(memory.LIMIT_VARIABLE, "0.002")
    refused = run_cli([*args, "--out", tmp_path / "refused"])
    assert_one_line_error(refused, "finetune needs about", "what would fit:", "--batch-size")
    assert not (tmp_path / "refused").exists()
