"""Peak memory, as ratios inside one run: each figure compares two child processes on the same
student and the same batch, and every child is measured alone (its own ru_maxrss).

    python bench/memory_bench.py   (or `make bench`; `python bench/run_all.py --only memory`)

(a) `deltakd finetune`, `distill --objective kd` and `--objective delta`, a few steps, over a
    plain transformers forward + backward + AdamW step of the same student on the same batch
    (labels, transformers' own loss): goal <= 1.1.
(b) `distill --objective kd --lora-r 16` over the same distill without LoRA: goal <= 0.8.
(c) the output layer at a large vocabulary: a student with Qwen2.5's 151,936-token head and a
    small hidden size, one distill step on one sequence of 2,048 tokens, over the same step with
    the head skipped (the loss taken on the hidden states instead, every other part the same):
    the extra, against one whole [2048 x 151936] float32 tensor (1.16 GiB), must stay below it,
    i.e. the logits are only ever held a chunk at a time.

Models are random Llama configurations built here (bench/synthetic.py; no download)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import synthetic
from common import REPO, WORKDIR, record

OUT = WORKDIR / "memory"
# (a), (b): a ~59M-parameter student, so fixed costs (the interpreter, imports) weigh little
STUDENT = dict(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
               tie_word_embeddings=False)  # fmt: skip
ROWS, PROMPT, RESPONSE, BATCH, STEPS = 16, 96, 159, 8, 2  # 256 tokens a row with the EOS
# (c): Qwen2.5's vocabulary, a tiny decoder
WIDE = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            tie_word_embeddings=False)  # fmt: skip
WIDE_PROMPT, WIDE_RESPONSE = 8, 2039  # 2,048 tokens, 2,039 target positions
KIB = 1024
PROBE = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


# ----------------------------------------------------------------------------- children


def child_plain(model_dir: str, rows_path: str) -> None:
    """(child) The plain transformers step: forward with labels (its own loss), backward, AdamW,
    STEPS times on the first BATCH rows, tokenised as deltakd does (same ids, same targets)."""
    import torch
    from transformers import AutoModelForCausalLM

    from deltakd_cli import data, models

    tokenizer = models.load_tokenizer(model_dir)
    examples = data.load_examples(Path(rows_path))[:BATCH]
    tokenized = data.tokenize_all(examples, "plain", tokenizer, PROMPT + RESPONSE + 1)
    input_ids = torch.tensor([item.input_ids for item in tokenized])
    mask = torch.tensor([item.target_mask for item in tokenized], dtype=torch.bool)
    labels = torch.where(mask, input_ids, torch.full_like(input_ids, -100))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(STEPS):
        loss = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                     labels=labels).loss  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def child_cli(arguments: list[str], skip_head: bool) -> None:
    """(child) The deltakd CLI in this process; with `skip_head`, each chunk's loss is taken on
    the hidden states instead of the logits (the output layer still gets a gradient, so AdamW
    holds the same state): the same step without the [positions, vocab] work."""
    if skip_head:
        from deltakd_cli.train.objective import ObjectiveModule

        def without_head(self, hidden, labels, cached, frozen_hidden):
            weight = self.student.get_output_embeddings().weight
            loss = hidden.float().pow(2).sum() + 0.0 * weight.sum()
            zero = loss.detach() * 0
            return loss, zero, zero

        ObjectiveModule._chunk_sums = without_head
    from deltakd_cli.cli import app

    app(arguments, standalone_mode=True)


# ----------------------------------------------------------------------------- parent


def peak_kib(name: str, command: list[str]) -> int:
    """Run one child (through the probe: only its own peak); its peak RSS in KiB."""
    log = OUT / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-c", PROBE, *command], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    log.write_text(f"$ {' '.join(command)}\n{result.stdout}\n{result.stderr}")
    if result.returncode != 0:
        raise SystemExit(f"{name} failed (see {log}):\n{result.stderr[-2000:]}")
    peak = int(result.stdout.split()[-1])
    print(f"  {name:28s} peak RSS {peak / KIB:8.0f} MiB", flush=True)
    return peak


def this_script(*arguments: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *arguments]


def deltakd(command: str, *arguments: str, skip_head: bool = False) -> list[str]:
    child = ["--child", "cli", *(["--skip-head"] if skip_head else []), "--"]
    return this_script(*child, command, *arguments)


def common_training(out: Path) -> list[str]:
    shutil.rmtree(out, ignore_errors=True)
    return ["--out", str(out), "--max-steps", str(STEPS), "--batch-size", str(BATCH),
            "--device", "cpu", "--dtype", "float32", "--save-every", "0", "--lr", "1e-4",
            "--warmup", "0"]  # fmt: skip


def build_cache(name: str, teacher: Path, tuned: Path, student: Path | None, rows: Path,
                max_length: int, batch_size: int) -> tuple[Path, int]:  # fmt: skip
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    arguments = ["--teacher-base", str(teacher), "--teacher-tuned", str(tuned),
                 "--data", str(rows), "--out", str(out), "--template", "plain",
                 "--max-length", str(max_length), "--batch-size", str(batch_size),
                 "--top-k", "64", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    if student is not None:
        arguments += ["--student", str(student)]
    return out, peak_kib(name, deltakd("cache-teachers", *arguments))


def training_ratios() -> tuple[dict, dict]:
    """(a) and (b) on the ~59M student."""
    from transformers import LlamaConfig

    tokenizer = synthetic.word_tokenizer(OUT / "tokenizer-32k", STUDENT["vocab_size"])
    student = synthetic.random_model(OUT / "student-59m", LlamaConfig(**STUDENT), tokenizer)
    tuned = synthetic.perturbed(student, OUT / "teacher-tuned-59m")
    rows = synthetic.rows(OUT / "rows.jsonl", ROWS, PROMPT, RESPONSE, STUDENT["vocab_size"])
    length = str(PROMPT + RESPONSE + 1)
    cache, _ = build_cache("cache", student, tuned, student, rows, PROMPT + RESPONSE + 1, 8)

    peaks = {
        "plain": peak_kib(
            "transformers fwd+bwd", this_script("--child", "plain", str(student), str(rows))
        )
    }
    peaks["finetune"] = peak_kib("deltakd finetune", deltakd(
        "finetune", "--model", str(student), "--data", str(rows), "--template", "plain",
        "--max-length", length, *common_training(OUT / "finetune")))  # fmt: skip
    for objective in ("kd", "delta"):
        peaks[f"distill_{objective}"] = peak_kib(f"deltakd distill {objective}", deltakd(
            "distill", "--cache", str(cache), "--student", str(student), "--objective", objective,
            "--num-workers", "0", "--no-verify-cache",
            *common_training(OUT / f"distill-{objective}")))  # fmt: skip
    peaks["distill_kd_lora"] = peak_kib("deltakd distill kd LoRA 16", deltakd(
        "distill", "--cache", str(cache), "--student", str(student), "--objective", "kd",
        "--num-workers", "0", "--no-verify-cache", "--lora-r", "16",
        *common_training(OUT / "distill-kd-lora")))  # fmt: skip
    figures = {
        "memory_finetune_vs_transformers": peaks["finetune"] / peaks["plain"],
        "memory_distill_kd_vs_transformers": peaks["distill_kd"] / peaks["plain"],
        "memory_distill_delta_vs_transformers": peaks["distill_delta"] / peaks["plain"],
        "memory_lora_distill_vs_full_distill": peaks["distill_kd_lora"] / peaks["distill_kd"],
    }
    settings = {"student": STUDENT, "rows": ROWS, "tokens_per_row": int(length),
                "batch_size": BATCH, "steps": STEPS, "lora_r": 16, "dtype": "float32",
                "peak_rss_mib": {name: round(peak / KIB) for name, peak in peaks.items()},
                "estimate_mib": {"distill_kd": estimate_mib(student, BATCH * int(length)),
                                 "distill_kd_lora": estimate_mib(student, BATCH * int(length),
                                                                 lora_r=16)}}  # fmt: skip
    return figures, settings


def estimate_mib(model: Path, tokens: int, lora_r: int = 0) -> int:
    """deltakd's own estimate (memory.py) of a distill run, for comparison with the peaks."""
    from deltakd_cli import memory
    from deltakd_cli.models import DEFAULT_LOAD
    from deltakd_cli.train.objective import default_chunk_size
    from deltakd_cli.train.options import DEFAULT_LORA_TARGETS

    shape = memory.shape_of_model(str(model), DEFAULT_LOAD)
    trainable = memory.lora_parameters(shape, lora_r, DEFAULT_LORA_TARGETS.split(","))
    chunk = default_chunk_size(shape.vocab_size)
    estimate = memory.training_estimate(
        shape,
        micro_batch_tokens=tokens,
        logit_chunk_positions=chunk,
        lora_trainable=trainable if lora_r else 0,
    )
    return round(estimate.total / 2**20)


def wide_head_ratio() -> tuple[dict, dict]:
    """(c): one kd step on one 2,048-token sequence at 151,936 ids, with and without the head."""
    from transformers import LlamaConfig

    vocab = WIDE["vocab_size"]
    tokenizer = synthetic.word_tokenizer(OUT / "tokenizer-152k", vocab)
    student = synthetic.random_model(OUT / "student-wide", LlamaConfig(**WIDE), tokenizer)
    rows = synthetic.rows(OUT / "rows-2048.jsonl", 1, WIDE_PROMPT, WIDE_RESPONSE, vocab)
    length = WIDE_PROMPT + WIDE_RESPONSE + 1
    cache, cache_peak = build_cache("cache-wide", student, student, None, rows, length, 1)
    peaks = {}
    for name, skip in (("with_head", False), ("head_skipped", True)):
        out = OUT / f"distill-wide-{name}"
        shutil.rmtree(out, ignore_errors=True)
        peaks[name] = peak_kib(f"distill kd 152k {name.replace('_', ' ')}", deltakd(
            "distill", "--cache", str(cache), "--student", str(student), "--objective", "kd",
            "--out", str(out), "--max-steps", "1", "--batch-size", "1", "--device", "cpu",
            "--dtype", "float32", "--save-every", "0", "--num-workers", "0",
            "--no-verify-cache", skip_head=skip))  # fmt: skip
    whole = length * vocab * 4  # one [tokens x vocab] float32 tensor, bytes
    extra = (peaks["with_head"] - peaks["head_skipped"]) * KIB
    figures = {"memory_head_152k_extra_vs_one_full_logits": extra / whole}
    settings = {"student": WIDE, "tokens": length, "target_positions": WIDE_RESPONSE + 1,
                "one_full_logits_mib": round(whole / 2**20), "extra_mib": round(extra / 2**20),
                "peak_rss_mib": {**{n: round(p / KIB) for n, p in peaks.items()},
                                 "cache_teachers": round(cache_peak / KIB)},
                "estimate_mib": {"distill_kd": estimate_mib(student, length)}}  # fmt: skip
    return figures, settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=("plain", "cli"))
    parser.add_argument("--skip-head", action="store_true")
    parser.add_argument("--only", choices=("training", "head"), action="append")
    parser.add_argument("rest", nargs="*")
    options = parser.parse_args()
    if options.child == "plain":
        return child_plain(*options.rest)
    if options.child == "cli":
        return child_cli(options.rest, options.skip_head)
    figures, settings = {}, {}
    if "training" in (options.only or ["training"]):
        found, settings["training"] = training_ratios()
        figures.update(found)
    if "head" in (options.only or ["head"]):
        found, settings["head_152k"] = wide_head_ratio()
        figures.update(found)
    settings["measured_as"] = "ru_maxrss of each child process alone (a probe parent waits for it)"
    record("memory", figures, settings)
    for name, value in figures.items():
        print(f"{name:45s} {value:8.3f}")


if __name__ == "__main__":
    main()
