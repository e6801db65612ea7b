"""deltakd's KD against TRL's online GKD on IDENTICAL batch sequences: at each data-order seed,
TRL trains on exactly the batches deltakd's plan makes at that seed (an order file and a fixed
batch sampler, bench/trl_runner.py --batch-order), so the per-seed difference measures the cached
target alone (docs/benchmarks.md, "KD against TRL on the same batches"; docs/method.md 3f).

    python bench/trl_paired.py [--demo-dir runs/demo] [--reuse] [--seeds 5]

Arms, each trained 1 epoch at every seed on trl_bench's rows, models and training settings:

  trl                 TRL GKDTrainer, lmbda 0, beta 0, on deltakd's batches at that seed
  <shape>_<tail>      deltakd KD (sft weight 0) from one cache of that shape with that tail
                      estimator (sampled: kd's default; corrected; bucket) on the default cache
                      (the unpaired bench/trl_noise.py keeps the top-64 + bucket arm)
  m64_sampled         the same head with 64 draws (4x): how much of the gap is the fixed
                      draws' noise floor

Per arm: held-out full-vocabulary KL(teacher || student) per response token on the held-out rows
(bench/heldout.py), and the paired difference to TRL with a bootstrap over the pairs and the rows
(heldout.paired_seeds_and_rows_bootstrap). Figures go to docs/benchmarks.json (section
trl_paired)."""

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
from heldout import paired_seeds_and_rows_bootstrap
from trl_noise import done, reused, saved, scores_of

from deltakd_cli import models
from deltakd_cli.cache.reader import CacheReader
from deltakd_cli.method.rules import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K
from deltakd_cli.train.batching import RunPlan, read_batch

PAIRED = WORKDIR / "trl-paired"
CACHES = {"default": (DEFAULT_TOP_K, DEFAULT_TAIL_SAMPLES), "m64": (DEFAULT_TOP_K, 64)}
ARMS = {  # arm -> (cache, tail)
    "default_sampled": ("default", "sampled"),
    # 4x the draws, the same head: what is left of the gap to TRL that more draws remove is the
    # fixed draws' noise floor
    "m64_sampled": ("m64", "sampled"),
    "default_corrected": ("default", "corrected"),
    "default_bucket": ("default", "bucket"),
}


def batch_order(cache: Path, seed: int) -> dict:
    """deltakd's plan at `seed` (1 epoch, trl_bench's batch size, one process), as the rows of
    the training file each batch holds, in training order, with its target tokens."""
    reader = CacheReader(str(cache))
    reader.check_structure()
    shards = [reader.shard_lengths(s) for s in range(reader.num_shards)]
    plan = RunPlan(shards, seed=seed, batch_size=tb.BATCH, max_tokens=None, world_size=1,
                   grad_accum=1, epochs=1)  # fmt: skip
    batches, targets = [], []
    for step in range(plan.total_steps):
        (spec,) = plan.step_batches(step)
        batches.append([int(e.example_index) for e in read_batch(reader, spec)])
        targets.append(spec.num_targets)
    return {"seed": seed, "batches": batches, "target_tokens": targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, default=Path(os.environ.get(
        "DELTAKD_DEMO_DIR", REPO / "runs" / "demo")))  # fmt: skip
    parser.add_argument("--reuse", action="store_true", help="keep runs already done")
    parser.add_argument("--seeds", type=int, default=5, help="data-order seeds")
    parser.add_argument("--arms", help="comma-separated deltakd arms (default: all)")
    options = parser.parse_args()
    arms_run = {a: ARMS[a] for a in (options.arms.split(",") if options.arms else ARMS)}
    tb.OUT.mkdir(parents=True, exist_ok=True)
    PAIRED.mkdir(parents=True, exist_ok=True)
    chosen = tb.resolve_models(options.demo_dir.resolve())
    teacher, student = chosen["teacher"], chosen["student"]
    rows, held_out, source = tb.write_rows(chosen)
    tokenizer = models.load_tokenizer(str(student))

    caches, timings = {}, {}
    needed = {"default"} | {cache for cache, _ in arms_run.values()}
    for name, (k, samples) in ((n, CACHES[n]) for n in CACHES if n in needed):
        out = PAIRED / f"cache-{name}"
        caches[name] = out
        if done(out, options.reuse, "manifest.json"):
            timings[f"cache_{name}"] = reused(out)
            continue
        shutil.rmtree(out, ignore_errors=True)
        command = tb.cache_command(teacher, rows, out, k) + ["--tail-samples", str(samples)]
        timings[f"cache_{name}"] = saved(out, tb.timed(f"cache {name}", command))

    seeds = list(range(options.seeds))
    students: dict[str, Path] = {}
    runs: dict[str, list[str]] = {arm: [] for arm in ("trl", *arms_run)}
    for seed in seeds:  # interleaved: drift of a shared machine hits every arm alike
        order = batch_order(caches["default"], seed)
        for cache in caches.values():  # every cache of the rows makes the same plan
            assert batch_order(cache, seed)["batches"] == order["batches"], cache
        order_file = PAIRED / f"order-s{seed}.json"
        order_file.write_text(json.dumps(order) + "\n")
        name = f"trl_s{seed}"
        students[name] = PAIRED / name
        if not done(students[name], options.reuse, "trl_run.json"):
            shutil.rmtree(students[name], ignore_errors=True)
            command = tb.trl("gkd", students[name], student, rows, 1, seed, teacher)
            command += ["--batch-order", str(order_file)]
            timings[name] = saved(students[name], tb.timed(f"trl {name}", command))
        runs["trl"].append(name)
        for arm, (cache, tail) in arms_run.items():
            name = f"{arm}_s{seed}"
            students[name] = PAIRED / name
            if not done(students[name], options.reuse, "model.safetensors"):
                shutil.rmtree(students[name], ignore_errors=True)
                command = tb.kd_command(caches[cache], student, students[name], 1, seed)
                command += ["--tail", tail]
                timings[name] = saved(students[name], tb.timed(f"distill {name}", command))
            steps = tb.deltakd_steps(students[name])
            if [s["target_tokens"] for s in steps] != order["target_tokens"]:
                raise SystemExit(f"{name} did not train on the order file's batches")
            runs[arm].append(name)
        trl_run = json.loads((students[f"trl_s{seed}"] / "trl_run.json").read_text())
        if trl_run["optimizer_steps"] != len(order["batches"]):
            raise SystemExit(
                f"trl_s{seed} took {trl_run['optimizer_steps']} steps, not the order's"
            )

    print("scoring on the held-out rows", flush=True)
    scores = scores_of(teacher, students, held_out, tokenizer)
    counts = scores[runs["trl"][0]]["counts"]

    def per_token(name: str, part: str = "kl") -> float:
        return float(scores[name][part].sum() / counts.sum())

    arms, comparisons = {}, {}
    for arm in ("trl", *arms_run):
        arms[arm] = {
            "heldout_kl": float(np.mean([per_token(n) for n in runs[arm]])),
            "bucket_term": float(np.mean([per_token(n, "bucket") for n in runs[arm]])),
            "within_tail_term": float(np.mean([per_token(n, "tail") for n in runs[arm]])),
            "runs": [per_token(n) for n in runs[arm]],
        }
    for arm in arms_run:
        comparisons[f"{arm}_minus_trl"] = paired_seeds_and_rows_bootstrap(
            [scores[n]["kl"] for n in runs["trl"]], [scores[n]["kl"] for n in runs[arm]], counts
        )
    stored = {
        name: json.loads((path / "manifest.json").read_text())["bytes_per_response_token"]
        for name, path in caches.items()
    }
    figures = {}
    for arm in arms_run:
        result = comparisons[f"{arm}_minus_trl"]
        figures[f"trl_paired_{arm}_minus_trl_heldout_kl"] = result["difference"]
        figures[f"trl_paired_{arm}_ci_low"] = result["ci_low"]
        figures[f"trl_paired_{arm}_ci_high"] = result["ci_high"]
    figures["trl_paired_default_bytes_per_response_token"] = stored["default"]
    for arm in arms_run:
        for part in ("bucket_term", "within_tail_term"):
            figures[f"trl_paired_{arm}_minus_trl_{part}"] = arms[arm][part] - arms["trl"][part]
    settings = {
        "models": chosen["models"], "rows": source, "seeds": seeds, "epochs": 1, "lr": tb.LR,
        "batch_size": tb.BATCH, "caches": {n: {"top_k": k, "tail_samples": m}
                                            for n, (k, m) in CACHES.items()},
        "arms": arms, "comparisons": comparisons, "stored_bytes_per_response_token": stored,
        "pairing": "TRL trains on deltakd's batch sequence at each seed (order-s*.json)",
        "noise": "percentile bootstrap, 10,000 resamples, over the seed pairs and the held-out "
                 "rows (heldout.paired_seeds_and_rows_bootstrap)",
    }  # fmt: skip
    record("trl_paired", figures, settings)
    print(json.dumps(arms, indent=1))
    for key, value in comparisons.items():
        per_seed = np.round(value["per_seed_differences"], 4)
        print(f"{key:28s} {value['difference']:+.4f} [{value['ci_low']:+.4f}, "
              f"{value['ci_high']:+.4f}]  per seed {per_seed}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
