"""deltakd against TRL, side by side in one run: token-level KD (TRL's GKDTrainer with lmbda = 0,
beta = 0, i.e. supervised forward KL, against `deltakd cache-teachers` + `deltakd distill
--objective kd --sft-weight 0`) and SFT (TRL's SFTTrainer against `deltakd finetune`).

    python bench/trl_bench.py [--demo-dir runs/demo]   (or `make bench`, which installs the
                                                        `bench` extra: trl)

Models: the demo's tuned teacher and base student (`make demo` makes them under runs/demo;
--demo-dir or DELTAKD_DEMO_DIR point elsewhere, read only); without them, the stand-ins of the
other benches (SmolLM2-135M-Instruct from the GGUF as teacher, distill_bench's 16M student).
Rows: the demo's train and test splits (or, with the stand-ins, the first rows of the evals file
for training and the next ones held out). Every run is a child process timed end to end by this
one (deltakd's cache build included) with its peak RSS; then one function scores every student
on the held-out rows. docs/benchmarks.md ("deltakd against TRL") says what is equal and what is
not."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from common import REPO, WORKDIR, abstract2title_rows, record, smollm2_dir
from heldout import (
    cross_entropy_per_position,
    kl_per_position,
    paired_token_bootstrap,
    per_row_sums,
    response_labels,
    response_logprobs,
)

from deltakd_cli import data, models
from deltakd_cli.method.rules import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K
from deltakd_cli.train.batching import RunPlan

ROWS, HELD_OUT, MAX_LENGTH, BATCH, LR = 48, 32, 256, 4, 2e-4
K = DEFAULT_TOP_K  # with cache-teachers' default tail draws: the default cache shape
EPOCHS = (1, 3)
SFT_EPOCHS = 1
HERE = Path(__file__).resolve().parent
OUT = WORKDIR / "trl"
PROBE = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def resolve_models(demo_dir: Path) -> dict:
    """The demo's tuned teacher and base student, or the stand-ins (said in one line)."""
    teacher, student = demo_dir / "models" / "teacher-tuned", demo_dir / "models" / "student-base"
    split = demo_dir / "data" / "train.jsonl", demo_dir / "data" / "test.jsonl"
    if all((p / "config.json").exists() for p in (teacher, student)) and all(
        p.exists() for p in split
    ):
        return {"models": "demo", "teacher": teacher, "student": student, "split": split}
    print(
        f"no demo models under {demo_dir} (run `make demo`, or pass --demo-dir): using the "
        "stand-ins (SmolLM2-135M-Instruct as teacher, distill_bench's 16M student)",
        flush=True,
    )
    from distill_bench import small_student

    teacher = smollm2_dir()
    return {"models": "stand-ins", "teacher": teacher, "student": Path(small_student(teacher))}


def write_rows(chosen: dict) -> tuple[Path, Path, str]:
    """The training rows and the held-out rows (never trained on), as JSONL files."""
    train, held_out = OUT / "train.jsonl", OUT / "held-out.jsonl"
    if "split" in chosen:
        lines = chosen["split"][0].read_text().splitlines()[:ROWS]
        test = chosen["split"][1].read_text().splitlines()[:HELD_OUT]
        source = f"the demo's split: first {ROWS} train rows, first {HELD_OUT} test rows"
    else:
        every = abstract2title_rows(ROWS + HELD_OUT).read_text().splitlines()
        lines, test = every[:ROWS], every[ROWS:]
        last = ROWS + HELD_OUT - 1
        source = f"evals abstract2title: rows 0-{ROWS - 1} train, {ROWS}-{last} held out"
    train.write_text("\n".join(lines) + "\n")
    held_out.write_text("\n".join(test) + "\n")
    return train, held_out, source


def plan_seeds(lengths: np.ndarray, count: int = 1) -> list[int]:
    """The first `count` seeds for which deltakd's batch plan makes every epoch exactly
    ROWS / BATCH full batches (its per-epoch offset is 0), so both systems take the same steps of
    BATCH rows."""
    seeds = []
    for seed in range(1000):
        plan = RunPlan([lengths], seed=seed, batch_size=BATCH, max_tokens=None, world_size=1,
                       grad_accum=1, epochs=max(EPOCHS))  # fmt: skip
        if all(plan.steps_in_epoch(e) == ROWS // BATCH for e in range(max(EPOCHS))):
            seeds.append(seed)
            if len(seeds) == count:
                return seeds
    raise SystemExit(f"fewer than {count} seeds give full batches in every epoch")


def timed(name: str, command: list[str]) -> dict:
    """Run one child process; its wall seconds (start-up and imports included) and peak RSS."""
    log = OUT / "logs" / f"{name.replace(' ', '-')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PROBE, *command], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - started
    log.write_text(f"$ {' '.join(command)}\n{result.stdout}\n{result.stderr}")
    if result.returncode != 0:
        raise SystemExit(f"{name} failed (see {log}):\n{result.stderr[-2000:]}")
    rss = int(result.stdout.split()[-1])
    print(f"  {name:18s} {seconds:8.1f} s   peak RSS {rss / 1024:7.0f} MiB", flush=True)
    return {"seconds": seconds, "peak_rss_kib": rss}


def deltakd(*args: str) -> list[str]:
    return [sys.executable, "-m", "deltakd_cli", *args]


def cache_command(teacher: Path, rows: Path, out: Path, k: int) -> list[str]:
    """deltakd's KD cache: the tuned teacher in both roles (run once), k ids per position."""
    return deltakd(
        "cache-teachers", "--teacher-base", str(teacher), "--teacher-tuned", str(teacher),
        "--data", str(rows), "--out", str(out), "--top-k", str(k),
        "--max-length", str(MAX_LENGTH), "--batch-size", "8", "--device", "cpu",
        "--dtype", "float32",
    )  # fmt: skip


def kd_command(cache: Path, student: Path, out: Path, epochs: int, seed: int) -> list[str]:
    """deltakd's KD run, the configuration equal to TRL's GKD with lmbda = 0, beta = 0."""
    return deltakd(
        "distill", "--cache", str(cache), "--student", str(student), "--objective", "kd",
        "--sft-weight", "0", "--out", str(out), *training_flags(epochs, seed),
    )  # fmt: skip


def training_flags(epochs: int, seed: int) -> list[str]:
    return [
        "--epochs", str(epochs), "--batch-size", str(BATCH), "--lr", str(LR), "--warmup", "0",
        "--seed", str(seed), "--device", "cpu", "--dtype", "float32", "--save-every", "0",
    ]  # fmt: skip


def trl(trainer: str, out: Path, student: Path, rows: Path, epochs: int, seed: int,
        teacher: Path | None = None) -> list[str]:  # fmt: skip
    command = [
        sys.executable, str(HERE / "trl_runner.py"), trainer, "--student", str(student),
        "--data", str(rows), "--out", str(out), "--max-length", str(MAX_LENGTH),
        "--epochs", str(epochs), "--batch-size", str(BATCH), "--lr", str(LR), "--seed", str(seed),
    ]  # fmt: skip
    return command + (["--teacher", str(teacher)] if teacher else [])


def deltakd_steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_same_run(name: str, deltakd_out: Path, trl_out: Path, tokens: int, epochs: int) -> dict:
    """Both systems took the same optimizer steps over the same target tokens, with the same
    learning rate at every step; refuse to report a comparison where they did not."""
    steps = deltakd_steps(deltakd_out)
    trl_run = json.loads((trl_out / "trl_run.json").read_text())
    trained = sum(s["target_tokens"] for s in steps)
    if trained != tokens * epochs or trl_run["target_tokens_per_epoch"] != tokens:
        raise SystemExit(f"{name}: target tokens differ ({trained}, {trl_run})")
    if len(steps) != trl_run["optimizer_steps"] or len(steps) != ROWS // BATCH * epochs:
        raise SystemExit(f"{name}: optimizer steps differ ({len(steps)}, {trl_run})")
    deltakd_lr = np.array([s["lr"] for s in steps])
    trl_lr = np.array([s["lr"] for s in trl_run["log"]])
    gap = float(np.abs(deltakd_lr - trl_lr).max() / LR)
    if gap > 1e-6:
        raise SystemExit(f"{name}: learning rates differ by {gap:.2e} of the peak")
    return {
        "optimizer_steps": len(steps),
        "lr_max_relative_gap": gap,
        "final_loss": {"deltakd": steps[-1]["loss"], "trl": trl_run["log"][-1]["loss"]},
        "trl_train_seconds": trl_run["train_seconds"],
        "deltakd_train_seconds": steps[-1]["elapsed_s"],
    }


def load(path: Path):
    return models.load_model(str(path), torch.float32, torch.device("cpu"))


def quality(teacher: Path, students: dict[str, Path], held_out: Path, tokenizer) -> dict:
    """Held-out KL(teacher || student) and reference cross-entropy per response token, every
    model scored by the same function on the same rows (bench/heldout.py)."""
    examples = data.tokenize_all(data.load_examples(held_out), "alpaca", tokenizer, MAX_LENGTH)
    vocab = models.tokenizer_vocab_size(tokenizer)
    labels = response_labels(examples)
    teacher_lp = response_logprobs(load(teacher), examples, vocab)
    scores = {"teacher": {"ce": per_row_sums(map(cross_entropy_per_position, teacher_lp, labels))}}
    for name, path in students.items():
        model = load(path)
        student_lp = response_logprobs(model, examples, vocab)
        del model
        scores[name] = {
            "kl": per_row_sums(map(kl_per_position, teacher_lp, student_lp)),
            "ce": per_row_sums(map(cross_entropy_per_position, student_lp, labels)),
        }
    return scores


def compare(scores: dict, metric: str, a: str, b: str) -> dict:
    """deltakd (a) against TRL (b): per-token means and the paired bootstrap of b - a."""
    sums_a, counts = scores[a][metric]
    sums_b, _ = scores[b][metric]
    return paired_token_bootstrap(sums_a, sums_b, counts)


def per_token(scores: dict, name: str, metric: str) -> float:
    sums, counts = scores[name][metric]
    return float(sums.sum() / counts.sum())


def summary(tokens: int, deltakd_s: float, trl_s: float, deltakd_rss: int, trl_rss: int) -> dict:
    return {
        "wall_seconds": {"deltakd": deltakd_s, "trl": trl_s},
        "tokens_per_s": {"deltakd": tokens / deltakd_s, "trl": tokens / trl_s},
        "peak_rss_mib": {"deltakd": deltakd_rss / 1024, "trl": trl_rss / 1024},
    }


def interval(comparison: dict) -> dict:
    return {
        "deltakd": comparison["a"],
        "trl": comparison["b"],
        "trl_minus_deltakd": comparison["difference"],
        "ci95": [comparison["ci_low"], comparison["ci_high"]],
        "within_noise": comparison["within_noise"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--demo-dir", type=Path,
        default=Path(os.environ.get("DELTAKD_DEMO_DIR", REPO / "runs" / "demo")),
        help="a `make demo` work directory (read only): its tuned teacher and base student",
    )  # fmt: skip
    options = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    chosen = resolve_models(options.demo_dir.resolve())
    teacher, student = chosen["teacher"], chosen["student"]
    train, held_out, source = write_rows(chosen)
    tokenizer = models.load_tokenizer(str(student))
    tokenized = data.tokenize_all(data.load_examples(train), "alpaca", tokenizer, MAX_LENGTH)
    tokens = sum(t.num_targets for t in tokenized)
    lengths = np.array([[len(t.input_ids), t.num_targets] for t in tokenized], dtype=np.int64)
    seed = plan_seeds(lengths)[0]
    for name in ("cache", "deltakd-kd-e1", "deltakd-kd-e3", "trl-gkd-e1", "trl-gkd-e3",
                 "deltakd-sft", "trl-sft"):  # fmt: skip
        shutil.rmtree(OUT / name, ignore_errors=True)
    print(f"{ROWS} rows, {tokens} target tokens per epoch, batch {BATCH}, seed {seed}", flush=True)

    # Interleaved, so slow drift of a shared machine falls on both systems alike.
    runs = {}
    runs["cache"] = timed("deltakd cache", cache_command(teacher, train, OUT / "cache", K))
    for epochs in EPOCHS:
        out = OUT / f"deltakd-kd-e{epochs}"
        runs[f"deltakd_kd_e{epochs}"] = timed(
            f"deltakd distill e{epochs}", kd_command(OUT / "cache", student, out, epochs, seed)
        )
        runs[f"trl_gkd_e{epochs}"] = timed(f"trl gkd e{epochs}", trl(
            "gkd", OUT / f"trl-gkd-e{epochs}", student, train, epochs, seed, teacher
        ))  # fmt: skip
    runs["deltakd_sft"] = timed(f"deltakd finetune e{SFT_EPOCHS}", deltakd(
        "finetune", "--model", str(student), "--data", str(train), "--template", "alpaca",
        "--max-length", str(MAX_LENGTH), "--out", str(OUT / "deltakd-sft"),
        *training_flags(SFT_EPOCHS, seed),
    ))  # fmt: skip
    runs["trl_sft"] = timed(f"trl sft e{SFT_EPOCHS}", trl(
        "sft", OUT / "trl-sft", student, train, SFT_EPOCHS, seed
    ))  # fmt: skip

    checks = {
        f"kd_e{e}": check_same_run(f"kd e{e}", OUT / f"deltakd-kd-e{e}", OUT / f"trl-gkd-e{e}",
                                   tokens, e)
        for e in EPOCHS
    }  # fmt: skip
    checks["sft"] = check_same_run("sft", OUT / "deltakd-sft", OUT / "trl-sft", tokens, SFT_EPOCHS)

    print("scoring the students on the held-out rows", flush=True)
    students = {"s0": student, "deltakd_sft": OUT / "deltakd-sft", "trl_sft": OUT / "trl-sft"}
    for e in EPOCHS:
        students[f"deltakd_kd_e{e}"] = OUT / f"deltakd-kd-e{e}"
        students[f"trl_gkd_e{e}"] = OUT / f"trl-gkd-e{e}"
    scores = quality(teacher, students, held_out, tokenizer)

    figures, kd = {}, {}
    for e in EPOCHS:
        deltakd_run, trl_run = runs[f"deltakd_kd_e{e}"], runs[f"trl_gkd_e{e}"]
        deltakd_seconds = runs["cache"]["seconds"] + deltakd_run["seconds"]
        deltakd_rss = max(runs["cache"]["peak_rss_kib"], deltakd_run["peak_rss_kib"])
        kl = compare(scores, "kl", f"deltakd_kd_e{e}", f"trl_gkd_e{e}")
        suffix = "1_epoch" if e == 1 else f"{e}_epochs"
        figures[f"trl_kd_tokens_per_s_ratio_{suffix}"] = trl_run["seconds"] / deltakd_seconds
        figures[f"trl_kd_peak_rss_ratio_{suffix}"] = deltakd_rss / trl_run["peak_rss_kib"]
        figures[f"trl_kd_heldout_kl_trl_minus_deltakd_{suffix}"] = kl["difference"]
        figures[f"trl_kd_heldout_kl_equal_within_noise_{suffix}"] = kl["within_noise"]
        kd[suffix] = {
            **summary(tokens * e, deltakd_seconds, trl_run["seconds"], deltakd_rss,
                      trl_run["peak_rss_kib"]),
            "deltakd_seconds_by_stage": {
                "cache_teachers": runs["cache"]["seconds"], "distill": deltakd_run["seconds"],
            },
            "deltakd_distill_only_tokens_per_s": tokens * e / deltakd_run["seconds"],
            "deltakd_peak_rss_mib_by_stage": {
                "cache_teachers": runs["cache"]["peak_rss_kib"] / 1024,
                "distill": deltakd_run["peak_rss_kib"] / 1024,
            },
            "heldout_kl": interval(kl),
            "checks": checks[f"kd_e{e}"],
        }  # fmt: skip
    ce = compare(scores, "ce", "deltakd_sft", "trl_sft")
    sft_deltakd, sft_trl = runs["deltakd_sft"], runs["trl_sft"]
    figures["trl_sft_tokens_per_s_ratio"] = sft_trl["seconds"] / sft_deltakd["seconds"]
    figures["trl_sft_peak_rss_ratio"] = sft_deltakd["peak_rss_kib"] / sft_trl["peak_rss_kib"]
    figures["trl_sft_heldout_ce_trl_minus_deltakd"] = ce["difference"]
    figures["trl_sft_heldout_ce_equal_within_noise"] = ce["within_noise"]
    sft = {
        "epochs": SFT_EPOCHS,
        **summary(tokens * SFT_EPOCHS, sft_deltakd["seconds"], sft_trl["seconds"],
                  sft_deltakd["peak_rss_kib"], sft_trl["peak_rss_kib"]),
        "heldout_ce": interval(ce),
        "checks": checks["sft"],
    }  # fmt: skip
    settings = {
        "models": chosen["models"], "teacher": str(teacher), "student": str(student),
        "rows": source, "train_rows": ROWS, "held_out_rows": HELD_OUT,
        "target_tokens_per_epoch": tokens, "max_length": MAX_LENGTH, "template": "alpaca",
        "batch_size": BATCH, "lr": LR, "schedule": "cosine to 0, no warmup", "seed": seed,
        "top_k": K, "tail_samples": DEFAULT_TAIL_SAMPLES, "dtype": "float32", "device": "cpu",
        "trl": metadata.version("trl"), "transformers": metadata.version("transformers"),
        "trl_gkd": "GKDTrainer lmbda=0 beta=0 temperature=1 seq_kd=False disable_dropout=True",
        "trl_sft": "SFTTrainer completion_only_loss=True packing=False",
        "trl_common": "bf16=False gradient_checkpointing=False optim=adamw_torch "
                      "lr_scheduler_type=cosine warmup_steps=0 max_grad_norm=1.0 "
                      "train_sampling_strategy=group_by_length, pre-tokenised rows",
        "deltakd_kd": "cache-teachers (tuned teacher as both roles: run once) + distill "
                      "--objective kd --sft-weight 0 --warmup 0",
        "kd": kd, "sft": sft,
        "heldout_per_token": {
            name: {m: per_token(scores, name, m) for m in scores[name]} for name in scores
        },
        "noise": "paired bootstrap over held-out rows (10,000 resamples, 95%), per-token means "
                 "as ratios of sums on each resample",
    }  # fmt: skip
    record("trl_comparison", figures, settings)
    for name, value in figures.items():
        print(f"{name:50s} {value:10.3f}" if isinstance(value, float) else f"{name:50s} {value}")


if __name__ == "__main__":
    main()
