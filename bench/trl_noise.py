"""Does the cache teach as well as the teacher online? deltakd's KD from each cache shape against
TRL's online full-vocabulary GKD, over enough data-order seeds to tell (docs/benchmarks.md,
"The cache against the teacher online").

    python bench/trl_noise.py [--demo-dir runs/demo] [--reuse] [--seeds 5]

Arms, each trained at 1 epoch at every data-order seed (trl_bench.plan_seeds: seeds that give both
systems the same full batches), on trl_bench's rows, models and training settings:

  trl            TRL GKDTrainer, lmbda 0, beta 0 (supervised forward KL over the full vocabulary)
  bucket_k64     top-64 + one tail bucket (the cache before format 5)
  sampled_k..    the exact top-k head + M ids drawn from pT's tail with replacement (format 5);
                 two caches per shape with different draw seeds, alternated over the runs, so the
                 run-level bootstrap includes the draw noise
  bucket_k1024   top-1024 + bucket (16x the ids of the default)

Per arm: held-out full-vocabulary KL(teacher || student) per response token, split at the
teacher's top-64 into the bucket term and the within-tail term (heldout.py); stored bytes per
response token from the cache's files; cache and distill seconds; peak RSS. Differences between
arms come with a two-level bootstrap over runs and held-out rows (heldout.seeds_and_rows_bootstrap).

Then "many students from one cache": KD at 3 seeds x 3 learning rates (9 students) from one cache
of the best sampled shape, against 9 TRL runs, end to end, each system's runs costed at the mean
of its 5 measured runs (a run's time does not depend on its learning rate). Figures go to
docs/benchmarks.json (section trl_noise)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import trl_bench as tb
from common import REPO, WORKDIR, record
from heldout import (
    kl_bucket_and_tail_per_position,
    per_row_sums,
    response_logprobs,
    seeds_and_rows_bootstrap,
)

from deltakd_cli import data, models

NOISE = WORKDIR / "trl-noise"
BASELINE_BYTES_K = 64
SHAPES = {  # arm -> (top-k, tail samples)
    "bucket_k64": (64, 0),
    # At or below bucket_k64's stored bytes (measured on 48 demo rows: 231.6 and 263.4 B per
    # response token against 273.7; top-16 + 48 draws took 286.6 and top-32 + 32 took 295.4).
    "sampled_k16_m32": (16, 32),
    "sampled_k32_m24": (32, 24),
    "bucket_k1024": (1024, 0),
}
DRAW_SEEDS = (0, 1)
LEARNING_RATES = (1e-4, 2e-4, 4e-4)
MANY_SEEDS = 3


def done(path: Path, reuse: bool, marker: str) -> bool:
    return reuse and (path / marker).exists()


def timing_file(path: Path) -> Path:
    return path.parent / f"{path.name}.timing.json"


def saved(path: Path, timing: dict) -> dict:
    """Keep a run's seconds and peak RSS beside it, so that --reuse still reports them."""
    timing_file(path).write_text(json.dumps(timing))
    return timing


def reused(path: Path) -> dict:
    file = timing_file(path)
    return json.loads(file.read_text()) if file.exists() else {}


def cache_for(
    arm: str, draw_seed: int, teacher: Path, rows: Path, reuse: bool
) -> tuple[Path, dict]:
    k, samples = SHAPES[arm]
    out = NOISE / f"cache-{arm}-d{draw_seed}"
    if done(out, reuse, "manifest.json"):
        return out, reused(out)
    shutil.rmtree(out, ignore_errors=True)
    command = tb.cache_command(teacher, rows, out, k)
    command += ["--tail-samples", str(samples), "--sample-seed", str(draw_seed)]
    return out, saved(out, tb.timed(f"cache {arm} d{draw_seed}", command))


def distill(cache: Path, student: Path, out: Path, seed: int, lr: float, reuse: bool) -> dict:
    if done(out, reuse, "model.safetensors"):
        return reused(out)
    shutil.rmtree(out, ignore_errors=True)
    command = tb.kd_command(cache, student, out, 1, seed)
    command[command.index("--lr") + 1] = str(lr)
    return saved(out, tb.timed(f"distill {out.name}", command))


def trl_run(teacher: Path, student: Path, rows: Path, out: Path, seed: int, lr: float,
            reuse: bool) -> dict:  # fmt: skip
    if done(out, reuse, "trl_run.json"):
        return reused(out)
    shutil.rmtree(out, ignore_errors=True)
    command = tb.trl("gkd", out, student, rows, 1, seed, teacher)
    command[command.index("--lr") + 1] = str(lr)
    return saved(out, tb.timed(f"trl {out.name}", command))


def scores_of(teacher: Path, students: dict[str, Path], held_out: Path, tokenizer) -> dict:
    """Per student: per-row sums of the full KL and of its bucket and within-tail terms."""
    examples = data.tokenize_all(data.load_examples(held_out), "alpaca", tokenizer, tb.MAX_LENGTH)
    vocab = models.tokenizer_vocab_size(tokenizer)
    teacher_lp = response_logprobs(tb.load(teacher), examples, vocab)
    scores = {}
    for name, path in students.items():
        model = tb.load(path)
        student_lp = response_logprobs(model, examples, vocab)
        del model
        parts = [
            kl_bucket_and_tail_per_position(t, s)
            for t, s in zip(teacher_lp, student_lp, strict=True)
        ]
        bucket, counts = per_row_sums(p[0] for p in parts)
        tail, _ = per_row_sums(p[1] for p in parts)
        scores[name] = {"bucket": bucket, "tail": tail, "kl": bucket + tail, "counts": counts}
        print(f"  scored {name}: KL {(bucket + tail).sum() / counts.sum():.4f}", flush=True)
    return scores


def parameters(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, default=Path(os.environ.get(
        "DELTAKD_DEMO_DIR", REPO / "runs" / "demo")))  # fmt: skip
    parser.add_argument("--reuse", action="store_true", help="keep runs already done")
    parser.add_argument("--seeds", type=int, default=5, help="data-order seeds per arm")
    options = parser.parse_args()
    tb.OUT.mkdir(parents=True, exist_ok=True)
    NOISE.mkdir(parents=True, exist_ok=True)
    chosen = tb.resolve_models(options.demo_dir.resolve())
    teacher, student = chosen["teacher"], chosen["student"]
    rows, held_out, source = tb.write_rows(chosen)
    tokenizer = models.load_tokenizer(str(student))
    tokenized = data.tokenize_all(data.load_examples(rows), "alpaca", tokenizer, tb.MAX_LENGTH)
    lengths = np.array([[len(t.input_ids), t.num_targets] for t in tokenized], dtype=np.int64)
    seeds = tb.plan_seeds(lengths, options.seeds)
    print(f"data-order seeds {seeds}; teacher {teacher}, student {student}", flush=True)

    timings: dict[str, dict] = {}
    caches: dict[str, list[Path]] = {}
    for arm, (_, samples) in SHAPES.items():
        for draw_seed in DRAW_SEEDS if samples else (0,):
            path, timing = cache_for(arm, draw_seed, teacher, rows, options.reuse)
            caches.setdefault(arm, []).append(path)
            timings[f"cache_{arm}_d{draw_seed}"] = timing
    students: dict[str, Path] = {}
    runs: dict[str, list[str]] = {arm: [] for arm in ("trl", *SHAPES)}
    for index, seed in enumerate(seeds):  # interleaved: drift of a shared machine hits all arms
        name = f"trl_s{seed}"
        students[name] = NOISE / name
        timings[name] = trl_run(teacher, student, rows, students[name], seed, tb.LR, options.reuse)
        runs["trl"].append(name)
        for arm in SHAPES:
            cache = caches[arm][index % len(caches[arm])]
            name = f"{arm}_s{seed}"
            students[name] = NOISE / name
            timings[name] = distill(cache, student, students[name], seed, tb.LR, options.reuse)
            runs[arm].append(name)

    print("scoring on the held-out rows", flush=True)
    scores = scores_of(teacher, students, held_out, tokenizer)
    counts = scores[runs["trl"][0]]["counts"]

    def mean(arm: str, part: str = "kl") -> float:
        return float(np.mean([scores[n][part].sum() / counts.sum() for n in runs[arm]]))

    def versus(a: str, b: str) -> dict:
        """b - a over runs and rows (negative: b is closer to the teacher)."""
        result = seeds_and_rows_bootstrap(
            [scores[n]["kl"] for n in runs[a]], [scores[n]["kl"] for n in runs[b]], counts
        )
        result["half_width"] = (result["ci_high"] - result["ci_low"]) / 2
        return result

    stored_bytes = {
        arm: float(
            np.mean(
                [
                    json.loads((p / "manifest.json").read_text())["bytes_per_response_token"]
                    for p in caches[arm]
                ]
            )
        )  # fmt: skip
        for arm in SHAPES
    }
    budget = stored_bytes["bucket_k64"]
    sampled = [arm for arm in SHAPES if SHAPES[arm][1] and stored_bytes[arm] <= budget * 1.001]
    best = min(sampled, key=mean) if sampled else "bucket_k64"
    arms = {}
    for arm in ("trl", *SHAPES):
        seconds = [timings[n].get("seconds") for n in runs[arm] if timings[n]]
        rss = [timings[n].get("peak_rss_kib") for n in runs[arm] if timings[n]]
        arms[arm] = {
            "heldout_kl": mean(arm),
            "bucket_term": mean(arm, "bucket"),
            "within_tail_term": mean(arm, "tail"),
            "runs": [scores[n]["kl"].sum() / counts.sum() for n in runs[arm]],
            "train_seconds_mean": float(np.mean(seconds)) if seconds else None,
            "peak_rss_mib_max": max(rss) / 1024 if rss else None,
        }
        if arm in SHAPES:
            k, samples = SHAPES[arm]
            cache_seconds = [timings[f"cache_{arm}_d{d}"].get("seconds") for d in DRAW_SEEDS
                             if timings.get(f"cache_{arm}_d{d}")]  # fmt: skip
            arms[arm].update({
                "top_k": k, "tail_samples": samples,
                "stored_bytes_per_response_token": stored_bytes[arm],
                "cache_seconds_mean": float(np.mean(cache_seconds)) if cache_seconds else None,
                "draw_seeds": list(DRAW_SEEDS) if samples else None,
            })  # fmt: skip
    comparisons = {f"{arm}_vs_trl": versus(arm, "trl") for arm in SHAPES}
    for arm in SHAPES:
        if SHAPES[arm][1]:
            comparisons[f"{arm}_vs_bucket_k64"] = versus("bucket_k64", arm)

    # Many students from one cache: 3 seeds x 3 learning rates, one cache of the best shape. A
    # run's time does not depend on its learning rate (the same steps over the same rows), so the
    # 9 runs of each system are costed at the mean of that system's 5 measured runs at the base
    # learning rate (the shared 2 cores did not leave time to train the 6 others of each here).
    many_timings = {"deltakd_cache": timings.get(f"cache_{best}_d0") or {}, "deltakd": [],
                    "trl": []}  # fmt: skip
    for system, names in (("deltakd", runs[best]), ("trl", runs["trl"])):
        seconds = [timings[n]["seconds"] for n in names if timings[n]]
        per_run = float(np.mean(seconds)) if seconds else None
        count = MANY_SEEDS * len(LEARNING_RATES)
        many_timings[system] = [{"seconds": per_run, "estimated": True}] * count if per_run else []
    many = None
    if all(many_timings["deltakd"]) and all(many_timings["trl"]) and many_timings["deltakd_cache"]:
        trl_total = sum(t["seconds"] for t in many_timings["trl"])
        distill_total = sum(t["seconds"] for t in many_timings["deltakd"])
        deltakd_total = many_timings["deltakd_cache"]["seconds"] + distill_total
        ceiling = trl_total / distill_total  # the ratio once the cache is paid for
        teacher_n, student_n = parameters(Path(teacher)), parameters(Path(student))
        many = {
            "students": len(many_timings["trl"]),
            "costing": "each system's 9 runs at the mean of its 5 measured runs (base lr); the "
            "cache as measured",
            "trl_seconds": trl_total,
            "deltakd_seconds": deltakd_total,
            "speedup": trl_total / deltakd_total,
            "amortisation_ceiling": ceiling,
            "fraction_of_ceiling": (trl_total / deltakd_total) / ceiling,
            "flop_ceiling": (teacher_n + 3 * student_n) / (3 * student_n),
            "teacher_parameters": teacher_n,
            "student_parameters": student_n,
        }

    default = comparisons[f"{best}_vs_trl"]
    figures = {
        "trl_noise_default_minus_trl_heldout_kl": -default["difference"],
        "trl_noise_default_vs_trl_ci_half_width": default["half_width"],
        "trl_noise_default_vs_trl_within_noise": default["within_noise"],
        "trl_noise_default_minus_bucket_k64_heldout_kl": comparisons[f"{best}_vs_bucket_k64"][
            "difference"],
        "trl_noise_default_better_than_bucket_k64": comparisons[f"{best}_vs_bucket_k64"][
            "ci_high"] < 0,
        "trl_noise_default_bytes_per_response_token": stored_bytes[best],
        "trl_noise_bucket_k64_bytes_per_response_token": budget,
        "trl_noise_bucket_k64_minus_trl_heldout_kl": -comparisons["bucket_k64_vs_trl"][
            "difference"],
        "trl_noise_k1024_minus_trl_heldout_kl": -comparisons["bucket_k1024_vs_trl"]["difference"],
    }  # fmt: skip
    if many:
        figures["trl_noise_many_students_speedup"] = many["speedup"]
        figures["trl_noise_many_students_fraction_of_ceiling"] = many["fraction_of_ceiling"]
        figures["trl_noise_many_students_flop_ceiling"] = many["flop_ceiling"]
    settings = {
        "models": chosen["models"], "rows": source, "seeds": seeds, "epochs": 1,
        "lr": tb.LR, "batch_size": tb.BATCH, "best_sampled_arm": best, "arms": arms,
        "comparisons": comparisons, "many_students": many,
        "many_students_learning_rates": list(LEARNING_RATES),
        "noise": "two-level percentile bootstrap, 10,000 resamples: runs of each arm (data-order "
                 "seed, and for sampled arms the cache's draw seed, alternated over runs) and "
                 "held-out rows drawn with replacement (heldout.seeds_and_rows_bootstrap)",
        "split": "held-out KL split at the teacher's top-64: bucket term + within-tail term",
    }  # fmt: skip
    record("trl_noise", figures, settings)
    print(json.dumps({"arms": arms, "best": best, "many": many}, indent=1, default=float))
    for key, value in comparisons.items():
        print(f"{key:32s} {value['difference']:+.4f} [{value['ci_low']:+.4f}, "
              f"{value['ci_high']:+.4f}]")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
