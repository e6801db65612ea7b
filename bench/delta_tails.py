"""Delta-KD and the halfway point of the KD-to-Delta family (gamma 0.5) from ONE cache, with each
tail estimator, on the demo's real models (docs/benchmarks.md, "Delta-KD's tail"): the figure
that decides whether the new default cache with its default tail serves Delta-KD at least as well
as the past top-64 + bucket cache.

    python bench/delta_tails.py [--demo-dir runs/demo] [--seeds 3] [--reuse] [--arms A,B,...]

Two caches of the demo's train rows with its healed base student S0 and the family grid (gamma
0, 0.5, 1 at alpha 1): the default shape (top-48 of the grid rule + 16 draws) and top-64 +
bucket. Arms (objective x cache x tail), each trained with the demo's distill settings at every
seed:

  <objective>_default_<tail>   tails: bucket (the Delta family's default: a top-48 bucket),
                               corrected (beta 1), sampled
  <objective>_k64_bucket       the past default

Per arm: ROUGE-L on the demo's 50 test rows (greedy, 48 new tokens, as the demo) through
`deltakd eval` with the seeds grouped and paired against k64_bucket (rows x seeds bootstrap), and
the held-out KL per response token on the same rows to the objective's own dense target (the
full-vocabulary p_gamma from both teachers and S0), paired by seed with a rows x seeds bootstrap.
Figures go to docs/benchmarks.json (section delta_tails)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from common import REPO, WORKDIR, record
from heldout import paired_seeds_and_rows_bootstrap

sys.path.insert(0, str(REPO))

from deltakd_cli import data, models  # noqa: E402
from deltakd_cli.method.objectives import OBJECTIVES as OBJECTIVE_REGISTRY  # noqa: E402
from deltakd_cli.method.rules import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K  # noqa: E402
from deltakd_cli.method.targets import exact_family_target  # noqa: E402

OUT = WORKDIR / "delta-tails"
GRID = "0,0.5,1"
CACHES = {"default": (DEFAULT_TOP_K, DEFAULT_TAIL_SAMPLES), "k64": (64, 0)}
OBJECTIVES = {"delta": ("delta", 1.0), "half": ("kd-to-delta", 0.5)}  # name -> (objective, gamma)
TAILS = ("bucket", "corrected", "sampled")
DISTILL = ["--epochs", "2", "--lr", "2e-4", "--batch-size", "8", "--sft-weight", "0.5",
           "--save-every", "0", "--device", "cpu"]  # the demo's distill settings  # fmt: skip


def arms() -> dict[str, tuple[str, str, str]]:
    """arm -> (objective name, cache, tail): first each objective's default tail on the default
    cache and the past default (what the comparison needs), then the other tails."""
    table = {}
    for name, (objective, _) in OBJECTIVES.items():
        default = OBJECTIVE_REGISTRY[objective].default_tail
        table[f"{name}_default_{default}"] = (name, "default", default)
        table[f"{name}_k64_bucket"] = (name, "k64", "bucket")
    for name in OBJECTIVES:
        for tail in TAILS:
            table.setdefault(f"{name}_default_{tail}", (name, "default", tail))
    return table


def deltakd(*args: str) -> None:
    command = [sys.executable, "-m", "deltakd_cli", *args]
    log = OUT / "logs" / f"{args[0]}-{Path(args[args.index('--out') + 1]).name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    log.write_text(f"$ {' '.join(command)}\n{result.stdout}\n{result.stderr}")
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed (see {log}):\n{result.stderr[-1500:]}")


def response_logprobs(model_dir: Path, tokenized: list) -> list[torch.Tensor]:
    """Full-vocabulary log-probs [positions, V] at each example's response positions."""
    model = models.load_model(str(model_dir), dtype=torch.float32, device=torch.device("cpu"))
    vocab = models.tokenizer_vocab_size(models.load_tokenizer(str(model_dir)))
    rows = []
    with torch.inference_mode():
        for example in tokenized:
            positions = torch.from_numpy(data.target_positions(example.target_mask))
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :, :vocab]
            rows.append(torch.log_softmax(logits[positions].float(), dim=-1))
    del model
    return rows


def kl_sums(target: list[torch.Tensor], student: list[torch.Tensor]) -> np.ndarray:
    """Per row: the sum over its positions of KL(target || student)."""
    return np.array(
        [float((t.exp() * (t - s)).sum()) for t, s in zip(target, student, strict=True)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, default=Path(os.environ.get(
        "DELTAKD_DEMO_DIR", REPO / "runs" / "demo")))  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="keep caches and runs already done")
    parser.add_argument("--arms", help="comma-separated arms (default: all, required ones first)")
    options = parser.parse_args()
    demo = options.demo_dir.resolve()
    base, tuned = demo / "models" / "teacher-base", demo / "models" / "teacher-tuned"
    student0 = demo / "models" / "student-base"
    train, test = demo / "data" / "train.jsonl", demo / "data" / "test.jsonl"
    missing = [str(p) for p in (base, tuned, student0, train, test) if not p.exists()]
    if missing:
        raise SystemExit(f"delta_tails needs the demo's models (make demo): {', '.join(missing)}")
    OUT.mkdir(parents=True, exist_ok=True)
    chosen = {name: arms()[name] for name in (options.arms.split(",") if options.arms else arms())}
    caches = {}
    for name, (k, samples) in CACHES.items():
        caches[name] = OUT / f"cache-{name}"
        if options.reuse and (caches[name] / "manifest.json").exists():
            continue
        shutil.rmtree(caches[name], ignore_errors=True)
        deltakd("cache-teachers", "--teacher-base", str(base), "--teacher-tuned", str(tuned),
                "--student", str(student0), "--data", str(train), "--out", str(caches[name]),
                "--top-k", str(k), "--tail-samples", str(samples), "--gammas", GRID,
                "--alphas", "1", "--max-length", "512", "--device", "cpu")  # fmt: skip
    seeds = list(range(options.seeds))
    runs: dict[str, list[Path]] = {}
    for seed in seeds:  # interleaved: drift of a shared machine hits every arm alike
        for arm, (objective, cache, tail) in chosen.items():
            out = OUT / f"{arm}_s{seed}"
            runs.setdefault(arm, []).append(out)
            if options.reuse and (out / "run.json").exists():
                continue
            shutil.rmtree(out, ignore_errors=True)
            name, gamma = OBJECTIVES[objective]
            settings = ["--gamma", str(gamma)] if name == "kd-to-delta" else []
            deltakd("distill", "--cache", str(caches[cache]), "--student", str(student0),
                    "--out", str(out), "--objective", name, *settings, "--tail", tail,
                    "--seed", str(seed), *DISTILL)  # fmt: skip
            print(f"  trained {out.name}", flush=True)

    # ROUGE-L: every student through deltakd eval, the seeds of an arm grouped, each arm paired
    # against its objective's k64_bucket arm.
    report = OUT / "REPORT.json"
    eval_args = ["eval", "--data", str(test), "--protocol", "greedy", "--max-new-tokens", "48",
                 "--batch-size", "10", "--out", str(report), "--overwrite", "--json"]  # fmt: skip
    for arm, paths in runs.items():
        # the seeds of an arm are one group (its models by path)
        eval_args += [f"--model={p}" for p in paths]
        eval_args += [f"--group={arm}=" + ",".join(str(p) for p in paths)]
    for arm, (objective, _, _) in chosen.items():
        baseline = f"{objective}_k64_bucket"
        if arm != baseline and baseline in runs:
            eval_args.append(f"--compare={arm}:{baseline}")
    deltakd(*eval_args)
    rouge = json.loads(report.read_text())

    # Held-out KL to each objective's own dense target, on the same rows.
    tokenizer = models.load_tokenizer(str(student0))
    tokenized = data.tokenize_all(data.load_examples(test), "alpaca", tokenizer, 512)
    teacher = {n: response_logprobs(p, tokenized) for n, p in (("base", base), ("tuned", tuned),
                                                                 ("s0", student0))}  # fmt: skip
    counts = np.array([t.shape[0] for t in teacher["tuned"]], dtype=np.float64)
    target = {
        objective: [
            exact_family_target(s0, tu, ba, gamma, 1.0)
            for s0, tu, ba in zip(teacher["s0"], teacher["tuned"], teacher["base"], strict=True)
        ]
        for objective, (_, gamma) in OBJECTIVES.items()
    }
    kl: dict[str, list[np.ndarray]] = {}
    for arm, paths in runs.items():
        objective = chosen[arm][0]
        kl[arm] = [kl_sums(target[objective], response_logprobs(p, tokenized)) for p in paths]
        print(f"  {arm}: KL to its target {np.mean([k.sum() for k in kl[arm]]) / counts.sum():.4f}")
    figures, comparisons = {}, {}
    for arm in runs:
        objective = chosen[arm][0]
        figures[f"delta_tails_{arm}_heldout_kl"] = float(
            np.mean([k.sum() for k in kl[arm]]) / counts.sum()
        )
        baseline = f"{objective}_k64_bucket"
        if arm != baseline and baseline in kl:
            result = paired_seeds_and_rows_bootstrap(kl[baseline], kl[arm], counts)
            comparisons[f"{arm}_minus_k64_bucket_kl"] = result
            figures[f"delta_tails_{arm}_minus_k64_bucket_kl"] = result["difference"]
            figures[f"delta_tails_{arm}_minus_k64_bucket_kl_ci_high"] = result["ci_high"]
    settings = {
        "seeds": seeds, "arms": {a: list(v) for a, v in chosen.items()},
        "caches": {n: {"top_k": k, "tail_samples": m, "grid": GRID} for n, (k, m) in
                   CACHES.items()},
        "distill": " ".join(DISTILL), "rouge_report": rouge, "kl_comparisons": comparisons,
        "kl": "per response token, KL(p_gamma || student) with p_gamma dense from both teachers "
              "and S0 (alpha 1), on the demo's 50 test rows; paired by seed, bootstrap over seed "
              "pairs and rows",
    }  # fmt: skip
    record("delta_tails", figures, settings)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    sys.exit(main())
