"""How well a sparse cache reproduces the exact Delta-KD target, on the demo's real pair.

Models (from the demo's work dir, `make demo` first): the base teacher SmolLM2-135M-Instruct,
the tuned teacher (its finetune on abstract2title), and two base students of 10 of its 30
layers: the pruned copy as copied (init-student/pruned) and the same healed (models/student-base).
Positions: the response positions of the held-out test split (never trained on), up to --positions.

For every id-selection rule in targets.SELECTION_RULES x tail rule x k in {8, 32, 64} and each
student, it reports the mean over positions of
  target_grad_cosine: cosine between the exact gradient of KL(p*||p_theta) with respect to the
                      student's logits at theta = S0 (p0 - p*) and the cached one (p0 - p*_cached)
  target_tv:          total variation between the exact p* and the cached target
(fidelity.target_fidelity). A configuration is "with student" when the cache needs S0's log-probs
(selection target or tuned+student, or the mass-matched tail); the others are teacher-only caches.

The KD-to-Delta family (docs/method.md): for a grid cache (selection "grid", --gammas 0,0.5,1
--alphas 1) it reports, per grid point (gamma, alpha), student and k, the cosine between the dense
full-vocabulary gradient of KL(p_gamma,alpha || p_theta) at theta = S0 and the gradient of the
cached kd-to-delta loss (fidelity.family_fidelity), with the stored exact tail and with the
fallback tail, and the bytes per response token the grid costs. Goal: >= 0.97 at k = 64.
Without the demo's models it measures the grid on the stand-ins (SmolLM2-135M-Instruct as base
teacher, a perturbed copy as tuned teacher, distill_bench's untrained 16M student, which is far
from the base teacher; abstract2title rows) and writes runs/bench/target_fidelity_grid.json.

    python bench/target_fidelity.py OUT.json [--work-dir runs/demo] [--positions 800]
                                    [--standin-positions 200]

Run without arguments (as `make bench` does) it writes docs/target_fidelity.json and merges the
headline figures into docs/benchmarks.json; it skips, with a message, when the demo has not run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deltakd_cli import data, models  # noqa: E402
from deltakd_cli.method import fidelity, targets  # noqa: E402

KS = (8, 32, 64)
CHUNK = 200  # positions per fidelity call (a few [200, 49152] float32 tensors at a time)
GRID = ((0.0, 1.0), (0.5, 1.0), (1.0, 1.0))  # (gamma, alpha): KD, halfway, Delta-KD
GRID_GOAL = 0.97  # cosine of the family gradient at k = 64
# Delta-KD's selection rules (the grid rule is measured per grid point below).
DELTA_RULES = tuple(r for r in targets.SELECTION_RULES if r not in targets.RULES_NEEDING_GRID)


def response_logprobs(model_dir: Path, tokenized: list, positions: int) -> torch.Tensor:
    """Full-vocabulary log-probs [N, V] at the first `positions` response positions."""
    model = models.load_model(str(model_dir), dtype=torch.float32, device=torch.device("cpu"))
    vocab = models.tokenizer_vocab_size(models.load_tokenizer(str(model_dir)))
    rows = []
    taken = 0
    with torch.inference_mode():
        for example in tokenized:
            ids = torch.tensor([example.input_ids])
            logits = model(input_ids=ids).logits[0, example.prompt_length - 1 : -1, :vocab]
            rows.append(torch.log_softmax(logits.float(), dim=-1)[: positions - taken])
            taken += rows[-1].shape[0]
            if taken >= positions:
                break
    del model
    return torch.cat(rows)


def entropy(logprobs: torch.Tensor) -> float:
    return float(-(logprobs.exp() * logprobs).sum(-1).mean())


def demo_paths(work: Path) -> dict[str, Path]:
    """The demo's teachers and its two base students (as copied, and healed)."""
    return {
        "teacher_base": work / "models" / "teacher-base",
        "teacher_tuned": work / "models" / "teacher-tuned",
        "copied": work / "init-student" / "pruned",
        "healed": work / "models" / "student-base",
    }


def measure(work: Path, positions: int) -> dict:
    paths = demo_paths(work)
    test = work / "data" / "test.jsonl"
    missing = [str(p) for p in [*paths.values(), test] if not p.exists()]
    if missing:
        raise FileNotFoundError(", ".join(missing))
    tokenizer = models.load_tokenizer(str(paths["teacher_base"]))
    tokenized = data.tokenize_all(data.load_examples(test), "alpaca", tokenizer, 512)
    started = time.perf_counter()
    logprobs = {name: response_logprobs(path, tokenized, positions) for name, path in paths.items()}
    count = logprobs["teacher_base"].shape[0]
    figures = []
    for student in ("copied", "healed"):
        for rule in DELTA_RULES:
            for tail_rule in targets.TAIL_RULES:
                for k in KS:
                    cosines, tvs = [], []
                    for start in range(0, count, CHUNK):
                        at = slice(start, start + CHUNK)
                        result = fidelity.target_fidelity(
                            logprobs[student][at],
                            logprobs["teacher_tuned"][at],
                            logprobs["teacher_base"][at],
                            k,
                            rule,
                            tail_rule,
                        )
                        cosines.append(result["cosine"])
                        tvs.append(result["tv"])
                    with_student = (
                        rule in targets.RULES_NEEDING_STUDENT or tail_rule == "mass-matched"
                    )
                    figures.append(
                        {
                            "student": student,
                            "selection": rule,
                            "tail_rule": tail_rule,
                            "k": k,
                            "with_student": with_student,
                            "target_grad_cosine": float(torch.cat(cosines).mean()),
                            "target_tv": float(torch.cat(tvs).mean()),
                        }
                    )
    return {
        "what": __doc__.split("\n\n")[0],
        "positions": count,
        "test_file": str(test),
        "models": {name: str(path) for name, path in paths.items()},
        "entropy_nats": {name: entropy(lp) for name, lp in logprobs.items()},
        "alpha": 1.0,
        "seconds": round(time.perf_counter() - started, 1),
        "figures": figures,
        "grid": grid_result(logprobs, ("copied", "healed")),
    }


def grid_result(logprobs: dict, students: tuple[str, ...]) -> dict:
    """Per student x k x grid point: the mean cosine of the cached kd-to-delta gradient with the
    dense family gradient at theta = S0 (stored exact tail, and the fallback tail)."""
    count = logprobs["teacher_base"].shape[0]
    figures = []
    for student in students:
        for k in KS:
            sums = {point: {"cosine": [], "cosine_fallback": []} for point in GRID}
            for start in range(0, count, CHUNK):
                at = slice(start, start + CHUNK)
                measured = fidelity.family_fidelity(
                    logprobs[student][at],
                    logprobs["teacher_tuned"][at],
                    logprobs["teacher_base"][at],
                    k,
                    GRID,
                )
                for point, values in measured.items():
                    for name, value in values.items():
                        sums[point][name].append(value)
            for (gamma, alpha), values in sums.items():
                figures.append(
                    {
                        "student": student,
                        "k": k,
                        "gamma": gamma,
                        "alpha": alpha,
                        "family_grad_cosine": float(torch.cat(values["cosine"]).mean()),
                        "family_grad_cosine_fallback": float(
                            torch.cat(values["cosine_fallback"]).mean()
                        ),
                    }
                )
    return {
        "points": [list(point) for point in GRID],
        "selection": "grid",
        "tail_rule": "mass-matched",
        # one stored value per position and grid point, at the cache's --precision
        "bytes_per_response_token": {"float16": 2 * len(GRID), "float32": 4 * len(GRID)},
        "goal": f"cosine >= {GRID_GOAL} at k = 64",
        "students": list(students),
        "figures": figures,
    }


def measure_standins(positions: int) -> dict:
    """The grid figures on the stand-ins (no demo needed)."""
    from common import abstract2title_rows, perturbed_copy, smollm2_dir
    from distill_bench import small_student

    base = smollm2_dir()
    paths = {
        "teacher_base": base,
        "teacher_tuned": perturbed_copy(base, "smollm2-perturbed", scale=0.02),
        "untrained-16m": Path(small_student(base)),
    }
    tokenizer = models.load_tokenizer(str(base))
    rows = abstract2title_rows(max(8, positions // 8))
    tokenized = data.tokenize_all(data.load_examples(rows), "alpaca", tokenizer, 512)
    started = time.perf_counter()
    logprobs = {name: response_logprobs(path, tokenized, positions) for name, path in paths.items()}
    return {
        "what": "KD-to-Delta grid fidelity on the stand-ins",
        "positions": logprobs["teacher_base"].shape[0],
        "models": {name: str(path) for name, path in paths.items()},
        "entropy_nats": {name: entropy(lp) for name, lp in logprobs.items()},
        "grid": grid_result(logprobs, ("untrained-16m",)),
        "seconds": round(time.perf_counter() - started, 1),
    }


def grid_table(grid: dict) -> str:
    """Rows (student, gamma, alpha), columns k; cells: cosine with the stored tail / fallback."""
    header = "".join(f"k={k}".rjust(16) for k in KS)
    lines = [
        "KD-to-Delta grid: cosine of the cached kd-to-delta gradient with the dense one at S0 "
        f"(stored tail / fallback tail); goal {grid['goal']}",
        f"{'student, (gamma, alpha)':34s}{header}",
    ]
    index = {(f["student"], f["gamma"], f["alpha"], f["k"]): f for f in grid["figures"]}
    for student in grid["students"]:
        for gamma, alpha in grid["points"]:
            cells = []
            for k in KS:
                f = index[(student, gamma, alpha, k)]
                stored, fallback = f["family_grad_cosine"], f["family_grad_cosine_fallback"]
                cells.append(f"{stored:.3f}/{fallback:.3f}".rjust(16))
            lines.append(f"{f'{student}, ({gamma:g}, {alpha:g})':34s}" + "".join(cells))
    costs = grid["bytes_per_response_token"]
    lines.append(
        f"grid cost: {costs['float16']} bytes per response token at float16, "
        f"{costs['float32']} at float32 ({len(grid['points'])} grid points)"
    )
    return "\n".join(lines)


def table(result: dict) -> str:
    """A text table: rows (selection, tail), columns student x k, cells cosine / TV."""
    header = "".join(f"{s} k={k}".rjust(16) for s in ("copied", "healed") for k in KS)
    lines = [
        f"{result['positions']} held-out positions; cells: grad cosine / TV",
        f"{'selection, tail':34s}{header}",
    ]
    index = {(f["student"], f["selection"], f["tail_rule"], f["k"]): f for f in result["figures"]}
    for rule in DELTA_RULES:
        for tail_rule in targets.TAIL_RULES:
            cells = []
            for student in ("copied", "healed"):
                for k in KS:
                    f = index[(student, rule, tail_rule, k)]
                    cells.append(f"{f['target_grad_cosine']:.3f}/{f['target_tv']:.3f}".rjust(16))
            lines.append(f"{rule + ', ' + tail_rule:34s}" + "".join(cells))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="JSON file to write the figures to")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "demo"))
    parser.add_argument("--positions", type=int, default=800)
    parser.add_argument("--standin-positions", type=int, default=200)
    options = parser.parse_args()
    try:
        result = measure(Path(options.work_dir), options.positions)
    except FileNotFoundError as missing:
        print(
            f"target_fidelity: the demo's models are missing ({missing}); the Delta-KD table "
            "needs `make demo`. Measuring the KD-to-Delta grid on the stand-ins instead."
        )
        standins = measure_standins(options.standin_positions)
        from common import WORKDIR

        out = WORKDIR / "target_fidelity_grid.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(standins, indent=2) + "\n")
        print(f"{standins['positions']} stand-in positions, {standins['seconds']}s")
        print(grid_table(standins["grid"]))
        entropies = {name: round(value, 2) for name, value in standins["entropy_nats"].items()}
        print(f"entropy (nats): {json.dumps(entropies)}")
        print(f"wrote {out}")
        return 1 if options.out else 0  # `make bench` without a demo: no demo figures, no failure
    out = Path(options.out) if options.out else REPO / "docs" / "target_fidelity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(grid_table(result["grid"]))
    print(
        f"entropy (nats): {json.dumps({k: round(v, 2) for k, v in result['entropy_nats'].items()})}"
    )
    print(f"wrote {out}")
    if not options.out:
        from common import record  # bench/common.py (run from this folder by run_all)

        headline = {
            f"target_grad_cosine_{f['student']}_k{f['k']}": f["target_grad_cosine"]
            for f in result["figures"]
            if f["selection"] == "target" and f["tail_rule"] == "mass-matched"
        }
        headline.update(
            {
                f"target_tv_{f['student']}_k{f['k']}": f["target_tv"]
                for f in result["figures"]
                if f["selection"] == "target" and f["tail_rule"] == "mass-matched"
            }
        )
        headline.update(
            {
                f"family_grad_cosine_{f['student']}_k{f['k']}_gamma{f['gamma']:g}": f[
                    "family_grad_cosine"
                ]
                for f in result["grid"]["figures"]
            }
        )
        record(
            "target_fidelity",
            headline,
            {
                "positions": result["positions"],
                "file": str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out),
                "rule": "selection target, tail mass-matched (the default with --student)",
                "grid": "selection grid, points (0, 1), (0.5, 1), (1, 1), stored family tail",
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
