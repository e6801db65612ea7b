"""`make bench`: run every benchmark, merge into docs/benchmarks.json, render docs/benchmarks.md.

Each benchmark is a script in this folder that records its figures through common.record().
`python bench/run_all.py --only cache` runs one; `--render` only rewrites the markdown."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCHES = {
    "cache": "cache_bench.py",
    "fidelity": "target_fidelity.py",
    "distill": "distill_bench.py",
}

# figure -> (goal text, predicate on the value or None, what it measures)
GOALS = {
    "cache_vs_forward": (
        ">= 0.85",
        lambda v: v >= 0.85,
        "cache-teachers response tokens/s (store included) / the teachers' own batched forward",
    ),
    "cache_vs_forward_heads_at_targets": (
        "report",
        None,
        "the same over decoder + output head at response positions only (the least any cache "
        "computes): the cost of choosing ids, tails and the store",
    ),
    "distill_kd_vs_sft": (">= 0.9", lambda v: v >= 0.9, "distill kd target tokens/s / sft"),
    "distill_delta_vs_sft": (
        ">= 0.9",
        lambda v: v >= 0.9,
        "distill delta (cached student log-probs) tokens/s / sft",
    ),
    "distill_delta_frozen_vs_sft": (
        ">= 0.7",
        lambda v: v >= 0.7,
        "distill delta with a live frozen S0 tokens/s / sft",
    ),
    "cached_vs_online_delta": (
        "report",
        None,
        "speed-up of cached Delta-KD over both teachers run every step",
    ),
    **{
        f"bytes_per_token_k{k}_{kind}{part}": (
            f"< {anchor} (DistillKit at k={k})",
            lambda v, anchor=anchor: v < anchor,
            "stored bytes per response token / distributions stored"
            + (", example tokens and offsets left out" if part.startswith("_entries") else ""),
        )
        for k, anchor in ((32, 73), (64, 146))
        for kind in ("teachers", "student")
        for part in ("_per_distribution", "_entries_per_distribution")
    },
    **{
        f"target_grad_cosine_{student}_k64": (
            ">= 0.97",
            lambda v: v >= 0.97,
            f"cosine of cached vs exact delta gradient at S0, default rule, {student} student",
        )
        for student in ("copied", "healed")
    },
    "distill_peak_rss_growth": (
        "< 1.1",
        lambda v: v < 1.1,
        "peak RSS with a 10x larger cache / the smaller one",
    ),
}


def render(results: dict) -> str:
    figures = results.get("figures", {})
    lines = [
        "# Benchmarks",
        "",
        "Regenerate with `make bench` (all) or `python bench/run_all.py --only NAME`.",
        "Figures are ratios measured inside one run (A vs B on the same data), because these",
        "machines are noisy; absolute rates are in the settings below for context only.",
        "",
        f"Machine: `{json.dumps(results.get('machine', {}))}`",
        "",
        "| figure | value | goal | met | what |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(figures):
        value = figures[name]
        goal, predicate, what = GOALS.get(name, ("", None, ""))
        met = "" if predicate is None else ("yes" if predicate(value) else "**no**")
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"| `{name}` | {shown} | {goal} | {met} | {what} |")
    lines += ["", "## Settings", ""]
    for section, settings in sorted(results.get("settings", {}).items()):
        lines.append(f"- **{section}**: `{json.dumps(settings)}`")
    notes = REPO / "docs" / "benchmarks-notes.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=sorted(BENCHES), action="append")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/benchmarks.md")
    options = parser.parse_args()
    if not options.render:
        for name in options.only or list(BENCHES):
            script = HERE / BENCHES[name]
            if not script.exists():
                print(f"skip {name}: {script.name} not present")
                continue
            print(f"== bench {name}", flush=True)
            subprocess.run([sys.executable, str(script)], cwd=HERE, check=True)
    results_path = REPO / "docs" / "benchmarks.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    (REPO / "docs" / "benchmarks.md").write_text(render(results))
    print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()
