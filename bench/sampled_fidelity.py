"""How well the sampled tail reproduces the KD-to-Delta family's gradient, on the demo's real pair
(the models and positions of bench/target_fidelity.py: copied and healed students).

For a student-aware cache of the default shape (top-k of the grid rule, M draws from the mixture
proposal 1/2 pT + 1/2 p*, grid 0, 0.5, 1 at alpha 1), per grid point gamma and student, at
theta = S0:

  expected_grad_cosine   cosine between the dense full-vocabulary gradient of KL(p_gamma || p_theta)
                         with respect to the student's logits (p0 - p_gamma) and the mean over
                         DRAW_SEEDS draw seeds of the cached one (sum(t_hat) p0 - t_hat); the
                         estimator is unbiased, so this tends to 1 as seeds grow
  one_draw_grad_cosine   the same for one draw seed (what one cache gives: the noise)
  bucket_grad_cosine     the top-64 + bucket cache of bench/target_fidelity.py, for comparison

    python bench/sampled_fidelity.py [--work-dir runs/demo] [--positions 400]

Figures go to docs/benchmarks.json (section sampled_fidelity)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from target_fidelity import demo_paths, response_logprobs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deltakd_cli import data, fidelity, losses, models, targets  # noqa: E402

GRID = ((0.0, 1.0), (0.5, 1.0), (1.0, 1.0))
SHAPE = (16, 32)  # (top-k, draws): the cache-teachers default
DRAW_SEEDS = 8
CHUNK = 100


def cosine(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(first.double(), second.double(), dim=1)


def sampled_gradient(cached: targets.CachedTargets, p0: torch.Tensor, gamma: float, alpha: float,
                     grid: tuple) -> torch.Tensor:  # fmt: skip
    """sum(t_hat) p0 - t_hat over the full vocabulary [N, V] at theta = S0."""
    target, weights, _ = losses.sampled_family_target(cached, gamma, alpha, alpha, grid)
    t_hat = (target + weights).exp().double()
    columns = targets.support_ids(cached)
    placed = torch.zeros_like(p0).scatter_add(1, columns, t_hat)
    return t_hat.sum(1, keepdim=True) * p0 - placed


def measure(work: Path, positions: int) -> dict:
    paths = demo_paths(work)
    tokenizer = models.load_tokenizer(str(paths["teacher_base"]))
    test = data.load_examples(work / "data" / "test.jsonl")
    tokenized = data.tokenize_all(test, "alpaca", tokenizer, 512)
    logprobs = {name: response_logprobs(path, tokenized, positions) for name, path in paths.items()}
    count = logprobs["teacher_base"].shape[0]
    k, samples = SHAPE
    figures = {}
    for student in ("copied", "healed"):
        sums: dict[str, list] = {}
        for start in range(0, count, CHUNK):
            at = slice(start, start + CHUNK)
            l0, lt, lb = (logprobs[n][at] for n in (student, "teacher_tuned", "teacher_base"))
            p0 = l0.double().exp()
            rows = l0.shape[0]
            index, position = torch.arange(start, start + rows), torch.zeros(rows, dtype=torch.long)
            bucket = fidelity.family_fidelity(l0, lt, lb, 64, GRID)
            per_seed = []
            for seed in range(DRAW_SEEDS):
                draws = targets.TailDraws(samples, seed, index, position)
                per_seed.append(targets.build_cached_targets(
                    lt, lb, l0, k, "grid", 1.0, "mass-matched", GRID, draws))  # fmt: skip
            for gamma, alpha in GRID:
                dense = p0 - targets.exact_family_target(l0, lt, lb, gamma, alpha).double().exp()
                grads = [sampled_gradient(c, p0, gamma, alpha, GRID) for c in per_seed]
                mean = torch.stack(grads).mean(0)
                for name, value in (
                    (f"expected_grad_cosine_gamma{gamma:g}", cosine(dense, mean)),
                    (f"one_draw_grad_cosine_gamma{gamma:g}", cosine(dense, grads[0])),
                    (f"bucket_k64_grad_cosine_gamma{gamma:g}", bucket[(gamma, alpha)]["cosine"]),
                ):
                    sums.setdefault(name, []).append(value)
        for name, values in sums.items():
            figures[f"sampled_fidelity_{student}_{name}"] = float(torch.cat(values).mean())
    return {"positions": count, "figures": figures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "demo"))
    parser.add_argument("--positions", type=int, default=400)
    options = parser.parse_args()
    work = Path(options.work_dir)
    if not (work / "init-student" / "pruned").exists():
        print("sampled_fidelity: the demo's models are missing; run `make demo` first")
        return 0
    result = measure(work, options.positions)
    for name, value in sorted(result["figures"].items()):
        print(f"{name:64s} {value:.4f}")
    from common import record

    record("sampled_fidelity", result["figures"], {
        "positions": result["positions"], "shape": {"top_k": SHAPE[0], "tail_samples": SHAPE[1]},
        "grid": [list(p) for p in GRID], "draw_seeds_in_expectation": DRAW_SEEDS,
        "proposal": "tuned+target (1/2 pT + 1/2 p* tails, p* at alpha 1)",
        "selection": "grid (ids serving every grid point)",
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
