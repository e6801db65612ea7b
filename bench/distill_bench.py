"""distill benchmarks: kd/delta throughput over sft from one cache, cached vs online Delta-KD,
and peak memory against cache size.

    python bench/distill_bench.py   (or `make bench`)

Teachers: SmolLM2-135M-Instruct and a perturbed copy (common.py). Student: a randomly initialised
Llama with SmolLM2's vocabulary, ~8x fewer parameters than the teacher. All ratios are measured
inside one run on the same cache, batches and steps."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys

import torch
from common import REPO, WORKDIR, abstract2title_rows, perturbed_copy, record, smollm2_dir

from deltakd_cli.cache.build import cache_teachers
from deltakd_cli.cache.options import CacheOptions

ROWS, MAX_LENGTH, K, STEPS, BATCH = 48, 256, 64, 12, 4


def small_student(teacher_dir) -> str:
    """A ~16M-parameter Llama over SmolLM2's tokenizer (the teacher has ~135M)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = WORKDIR / "student-16m"
    if not (target / "config.json").exists():
        teacher = AutoConfig.from_pretrained(teacher_dir)
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=teacher.vocab_size, hidden_size=256, intermediate_size=768,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, tie_word_embeddings=True,
            bos_token_id=teacher.bos_token_id, eos_token_id=teacher.eos_token_id,
        )  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(target)
        AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(target)
    return str(target)


def parameters(model_dir) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def build_cache(base, tuned, student, rows, name, max_length=MAX_LENGTH) -> dict:
    out = WORKDIR / name
    shutil.rmtree(out, ignore_errors=True)
    return cache_teachers(
        CacheOptions(teacher_base=str(base), teacher_tuned=str(tuned), student=student,
                    data=str(rows), out=str(out), top_k=K, max_length=max_length,
                    batch_size=8, device="cpu", dtype="float32")
    )  # fmt: skip


def distill(cache: str, student: str, objective: str, *extra: str, workers: int = 2) -> dict:
    """Run `deltakd distill` in a child process; per-step throughput and the child's peak RSS."""
    out = WORKDIR / f"distill-{objective}{'-'.join(('',) + extra)}"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable, "-m", "deltakd_cli", "distill", "--cache", cache, "--student", student,
        "--out", str(out), "--objective", objective, "--max-steps", str(STEPS),
        "--batch-size", str(BATCH), "--device", "cpu", "--dtype", "float32", "--save-every", "0",
        "--num-workers", str(workers), "--no-verify-cache", *extra,
    ]  # fmt: skip
    probe = (
        "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
    )
    result = subprocess.run([sys.executable, "-c", probe, *command], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"distill {objective} failed:\n{result.stderr[-2000:]}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [step["tokens_per_s"] for step in steps[2:]]  # the first steps warm up
    return {
        "tokens_per_s": statistics.median(rates),
        "peak_rss_kib": int(result.stdout.split()[-1]),
    }


def main() -> None:
    base = smollm2_dir()
    tuned = perturbed_copy(base, "smollm2-perturbed", scale=0.02)
    student = small_student(base)
    rows = abstract2title_rows(ROWS)
    manifest = build_cache(base, tuned, student, rows, "distill-cache")
    cache = str(WORKDIR / "distill-cache")

    runs = {
        "sft": distill(cache, student, "sft"),
        "kd": distill(cache, student, "kd"),
        "delta": distill(cache, student, "delta"),
        "delta_frozen": distill(cache, student, "delta", "--frozen-student"),
    }
    sft = runs["sft"]["tokens_per_s"]
    # Online Delta-KD (the paper's set-up) pays the teachers' (and S0's) forward at every step on
    # top of the same student step: per token, 1/online = 1/teachers + 1/cached.
    teachers_rate = manifest["timing"]["response_tokens_per_second"]
    delta_rate = runs["delta"]["tokens_per_s"]
    online_rate = 1.0 / (1.0 / teachers_rate + 1.0 / delta_rate)

    # Peak memory against cache size: the same steps over a cache 10x larger. Teachers here are
    # the small student itself: what is measured is the reader, not the teachers.
    small_rows, large_rows = abstract2title_rows(40), WORKDIR / "abstract2title-x10.jsonl"
    lines = small_rows.read_text().splitlines()
    large_rows.write_text("".join(f"{line}\n" for _ in range(10) for line in lines))
    build_cache(student, student, student, small_rows, "rss-small", max_length=128)
    build_cache(student, student, student, large_rows, "rss-large", max_length=128)
    rss_small = distill(str(WORKDIR / "rss-small"), student, "kd", workers=0)["peak_rss_kib"]
    rss_large = distill(str(WORKDIR / "rss-large"), student, "kd", workers=0)["peak_rss_kib"]

    figures = {
        "distill_kd_vs_sft": runs["kd"]["tokens_per_s"] / sft,
        "distill_delta_vs_sft": delta_rate / sft,
        "distill_delta_frozen_vs_sft": runs["delta_frozen"]["tokens_per_s"] / sft,
        "cached_vs_online_delta": delta_rate / online_rate,
        "distill_peak_rss_growth": rss_large / rss_small,
    }
    settings = {
        "rows": ROWS, "max_length": MAX_LENGTH, "k": K, "steps": STEPS, "batch_size": BATCH,
        "teacher_parameters": parameters(base), "student_parameters": parameters(student),
        "tokens_per_s": {name: run["tokens_per_s"] for name, run in runs.items()},
        "teachers_and_s0_forward_tokens_per_s": teachers_rate,
        "online_estimate": "1/online = 1/(teachers + S0 forward, cache-teachers rate) + 1/cached",
        "rss_kib": {"small_cache": rss_small, "large_cache_10x": rss_large},
    }  # fmt: skip
    record("distill", figures, settings)
    for name, value in figures.items():
        print(f"{name:40s} {value:10.3f}")


if __name__ == "__main__":
    main()
