"""How much of the held-out KL gap between deltakd's KD and TRL's GKD (bench/trl_bench.py) is
training-order noise, and how much is the cache's top-k.

    python bench/trl_noise.py [--reuse]      (after bench/trl_bench.py, whose rows, k = 64
                                              cache and seed-0 students it reuses)

trl_bench.py scores one student per system, both trained with the same seed. But the two systems
order the same rows into batches differently (deltakd's length-grouped plan, TRL's
group_by_length sampler), so one run each is one draw of the training order each, and the paired
bootstrap over held-out rows it reports says nothing about that draw. This script

  1. trains each system at 1 epoch with the next data-order seeds that give both the same full
     batches (trl_bench.plan_seeds), three runs per system in all, and compares the systems with
     a two-level bootstrap over runs and rows (heldout.seeds_and_rows_bootstrap);
  2. trains deltakd from caches of k = 256 (first seed) and 1024 (every seed; the same rows), to
     show how much of the gap the top-k tail bucket explains.

--reuse keeps students already trained in runs/bench/trl-noise (their settings are fixed here).
Figures go to docs/benchmarks.json (section trl_noise)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import trl_bench as tb
from common import WORKDIR, record
from heldout import seeds_and_rows_bootstrap

from deltakd_cli import data, models

RUNS = 3  # data-order seeds per system
LARGER_KS = (256, 1024)
NOISE = WORKDIR / "trl-noise"


def trained(path: Path, reuse: bool, marker: str) -> bool:
    return reuse and (path / marker).exists()


def cache_at(k: int, teacher: Path, reuse: bool) -> Path:
    out = NOISE / f"cache-k{k}"
    if not trained(out, reuse, "manifest.json"):
        command = tb.cache_command(teacher, tb.OUT / "train.jsonl", out, k) + ["--overwrite"]
        subprocess.run(command, check=True, capture_output=True)
    return out


def deltakd_kd(cache: Path, student: Path, out: Path, seed: int, reuse: bool) -> Path:
    if not trained(out, reuse, "model.safetensors"):
        command = tb.kd_command(cache, student, out, 1, seed) + ["--overwrite"]
        subprocess.run(command, check=True, capture_output=True)
    return out


def trl_gkd(teacher: Path, student: Path, out: Path, seed: int, reuse: bool) -> Path:
    if not trained(out, reuse, "trl_run.json"):
        command = tb.trl("gkd", out, student, tb.OUT / "train.jsonl", 1, seed, teacher)
        subprocess.run(command, check=True, capture_output=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="keep students already trained")
    options = parser.parse_args()
    settings_path = WORKDIR / "trl" / "settings.json"
    first = tb.OUT / "deltakd-kd-e1"
    if not (first / "model.safetensors").exists():
        raise SystemExit("run bench/trl_bench.py first (its rows, cache and students are reused)")
    run = json.loads((first / "run.json").read_text())
    student = Path(run["options"]["student"])
    manifest = json.loads((tb.OUT / "cache" / "manifest.json").read_text())
    teacher = Path(manifest["options"]["teacher_tuned"])
    tokenizer = models.load_tokenizer(str(student))
    tokenized = data.tokenize_all(
        data.load_examples(tb.OUT / "train.jsonl"), "alpaca", tokenizer, tb.MAX_LENGTH
    )
    lengths = np.array([[len(t.input_ids), t.num_targets] for t in tokenized], dtype=np.int64)
    seeds = tb.plan_seeds(lengths, RUNS)
    NOISE.mkdir(parents=True, exist_ok=True)
    print(f"data-order seeds {seeds}; teacher {teacher}, student {student}", flush=True)

    students = {f"deltakd_s{seeds[0]}": first, f"trl_s{seeds[0]}": tb.OUT / "trl-gkd-e1"}
    for seed in seeds[1:]:
        print(f"  seed {seed}: deltakd kd, trl gkd", flush=True)
        students[f"deltakd_s{seed}"] = deltakd_kd(
            tb.OUT / "cache", student, NOISE / f"deltakd-kd-s{seed}", seed, options.reuse
        )
        students[f"trl_s{seed}"] = trl_gkd(
            teacher, student, NOISE / f"trl-gkd-s{seed}", seed, options.reuse
        )
    for k in LARGER_KS:
        # the largest k at every seed (is the gap left there noise?), the others at the first
        k_seeds = seeds if k == LARGER_KS[-1] else seeds[:1]
        print(f"  k = {k}: cache, deltakd kd at seeds {k_seeds}", flush=True)
        cache = cache_at(k, teacher, options.reuse)
        for seed in k_seeds:
            students[f"deltakd_k{k}_s{seed}"] = deltakd_kd(
                cache, student, NOISE / f"deltakd-kd-k{k}-s{seed}", seed, options.reuse
            )

    print("scoring on the held-out rows", flush=True)
    scores = tb.quality(teacher, students, tb.OUT / "held-out.jsonl", tokenizer)
    _, counts = scores[f"deltakd_s{seeds[0]}"]["kl"]
    deltakd_runs = [scores[f"deltakd_s{s}"]["kl"][0] for s in seeds]
    trl_runs = [scores[f"trl_s{s}"]["kl"][0] for s in seeds]
    over_seeds = seeds_and_rows_bootstrap(deltakd_runs, trl_runs, counts)
    largest = LARGER_KS[-1]
    largest_runs = [scores[f"deltakd_k{largest}_s{s}"]["kl"][0] for s in seeds]
    over_seeds_largest = seeds_and_rows_bootstrap(largest_runs, trl_runs, counts)
    per_run = {name: tb.per_token(scores, name, "kl") for name in students}
    figures = {
        "trl_kd_heldout_kl_trl_minus_deltakd_over_seeds_1_epoch": over_seeds["difference"],
        "trl_kd_heldout_kl_equal_within_noise_over_seeds_1_epoch": over_seeds["within_noise"],
        "trl_kd_heldout_kl_seed_range_deltakd_1_epoch": float(np.ptp(over_seeds["a_runs"])),
        "trl_kd_heldout_kl_seed_range_trl_1_epoch": float(np.ptp(over_seeds["b_runs"])),
        f"trl_kd_heldout_kl_trl_minus_deltakd_k{largest}_over_seeds_1_epoch": over_seeds_largest[
            "difference"
        ],
        f"trl_kd_heldout_kl_equal_within_noise_k{largest}_over_seeds_1_epoch": over_seeds_largest[
            "within_noise"
        ],
    }
    by_k = {64: per_run[f"deltakd_s{seeds[0]}"]}
    for k in LARGER_KS:
        by_k[k] = per_run[f"deltakd_k{k}_s{seeds[0]}"]
        gap = tb.compare(scores, "kl", f"deltakd_k{k}_s{seeds[0]}", f"trl_s{seeds[0]}")
        figures[f"trl_kd_heldout_kl_trl_minus_deltakd_k{k}_1_epoch"] = gap["difference"]
    settings = {
        "seeds": seeds,
        "epochs": 1,
        "noise": "two-level percentile bootstrap, 10,000 resamples: runs of each system and "
        "held-out rows drawn with replacement (heldout.seeds_and_rows_bootstrap)",
        "heldout_kl_per_token": per_run,
        "heldout_kl_by_k_first_seed": {str(k): v for k, v in by_k.items()},
        "over_seeds": {
            key: over_seeds[key]
            for key in ("a_runs", "b_runs", "a", "b", "difference", "ci_low", "ci_high")
        },
        f"over_seeds_k{largest}": {
            key: over_seeds_largest[key]
            for key in ("a_runs", "b_runs", "a", "b", "difference", "ci_low", "ci_high")
        },
        "trl_bench_settings": str(settings_path) if settings_path.exists() else None,
    }
    record("trl_noise", figures, settings)
    for name, value in per_run.items():
        print(f"  {name:24s} held-out KL {value:.4f} nats/token")
    low, high = over_seeds["ci_low"], over_seeds["ci_high"]
    print(
        f"TRL - deltakd over {RUNS} seeds each: {over_seeds['difference']:+.4f} "
        f"[{low:+.4f}, {high:+.4f}] ({'within' if over_seeds['within_noise'] else 'beyond'} noise)"
    )
    low, high = over_seeds_largest["ci_low"], over_seeds_largest["ci_high"]
    noise = "within" if over_seeds_largest["within_noise"] else "beyond"
    print(
        f"TRL - deltakd at k = {largest}: {over_seeds_largest['difference']:+.4f} "
        f"[{low:+.4f}, {high:+.4f}] ({noise} noise)"
    )


if __name__ == "__main__":
    sys.exit(main())
