"""How well ONE cache's tail estimators reproduce the KD-to-Delta family's gradient at the start of
training, on the demo's real pair (the models and positions of bench/target_fidelity.py: copied
and healed students): the figure that chooses each objective's default tail (docs/method.md,
"Which cache and tail for which objective").

For each cache shape (top-k of the grid rule, the mass-matched tail, M draws from the mixture
proposal 1/2 pT + 1/2 p*, grid gamma 0, 0.5, 1 at alpha 1; draw seed 0: one cache, not the mean
of several), each tail estimator (bucket, sampled, corrected at beta 0.5 and 1) and each grid
point, at theta = S0: the mean over positions of the cosine between the dense full-vocabulary
gradient of KL(p_gamma || p_theta) with respect to the student's logits (p0 - p_gamma) and the
gradient of the cached loss on the tail's view (fidelity.view_grad_cosine, autograd through the
training code's own view and divergence).

    python bench/tail_fidelity.py [--work-dir runs/demo] [--positions 400]

Figures go to docs/benchmarks.json (section tail_fidelity)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from target_fidelity import demo_paths, response_logprobs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deltakd_cli import data, models  # noqa: E402
from deltakd_cli.method import fidelity, targets  # noqa: E402
from deltakd_cli.method.spec import CacheFacts, TargetSpec, tail_estimator  # noqa: E402

GRID = ((0.0, 1.0), (0.5, 1.0), (1.0, 1.0))
SHAPES = {  # name -> (top-k, draws)
    "k16_m32": (16, 32),
    "k32_m24": (32, 24),
    "k48_m16": (48, 16),
    "k64_m0": (64, 0),
}
TAILS = (("bucket", 1.0), ("sampled", 1.0), ("corrected", 0.5), ("corrected", 1.0))
CHUNK = 100


def tail_name(name: str, beta: float) -> str:
    return f"corrected{beta:g}" if name == "corrected" else name


def measure(work: Path, positions: int) -> dict:
    paths = demo_paths(work)
    tokenizer = models.load_tokenizer(str(paths["teacher_base"]))
    test = data.load_examples(work / "data" / "test.jsonl")
    tokenized = data.tokenize_all(test, "alpaca", tokenizer, 512)
    logprobs = {name: response_logprobs(path, tokenized, positions) for name, path in paths.items()}
    count = logprobs["teacher_base"].shape[0]
    facts = CacheFacts(1.0, GRID, 1.0)
    sums: dict[str, list] = {}
    for student in ("copied", "healed"):
        for start in range(0, count, CHUNK):
            at = slice(start, start + CHUNK)
            l0, lt, lb = (logprobs[n][at] for n in (student, "teacher_tuned", "teacher_base"))
            rows = l0.shape[0]
            index, position = torch.arange(start, start + rows), torch.zeros(rows, dtype=torch.long)
            for shape, (k, samples) in SHAPES.items():
                draws = targets.TailDraws(samples, 0, index, position) if samples else None
                cached = targets.build_cached_targets(
                    lt, lb, l0, k, "grid", 1.0, "mass-matched", GRID, draws
                )
                for name, beta in TAILS:
                    if name != "bucket" and not samples:
                        continue
                    tail = tail_estimator(name, beta)
                    for gamma, alpha in GRID:
                        spec = TargetSpec(((1.0, gamma),), alpha)
                        cosine = fidelity.view_grad_cosine(l0, lt, lb, cached, spec, tail, facts)
                        key = f"{student}_{shape}_{tail_name(name, beta)}_gamma{gamma:g}"
                        sums.setdefault(key, []).append(cosine)
    figures = {f"tail_fidelity_{key}": float(torch.cat(v).mean()) for key, v in sums.items()}
    return {"positions": count, "figures": figures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "demo"))
    parser.add_argument("--positions", type=int, default=400)
    options = parser.parse_args()
    work = Path(options.work_dir)
    if not (work / "init-student" / "pruned").exists():
        print("tail_fidelity: the demo's models are missing; run `make demo` first")
        return 0
    result = measure(work, options.positions)
    for name, value in sorted(result["figures"].items()):
        print(f"{name:64s} {value:.4f}")
    from common import record

    record("tail_fidelity", result["figures"], {
        "positions": result["positions"],
        "shapes": {name: {"top_k": k, "tail_samples": m} for name, (k, m) in SHAPES.items()},
        "grid": [list(p) for p in GRID], "draw_seed": 0,
        "proposal": "tuned+target (1/2 pT + 1/2 p* tails, p* at alpha 1)",
        "selection": "grid (ids serving every grid point)",
        "metric": "mean over positions of the per-position cosine, one cache, theta = S0",
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
