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
    "trl": "trl_bench.py",
    "trl-noise": "trl_noise.py",
    "tail-fidelity": "tail_fidelity.py",
    "trl-paired": "trl_paired.py",
    "delta-tails": "delta_tails.py",
    "memory": "memory_bench.py",
    "startup": "startup_bench.py",
}

# The default cache's shape and each objective family's default tail, as tail_fidelity names them.
DEFAULT_SHAPE = "k48_m16"
DEFAULT_TAILS = (("0", "sampled"), ("0.5", "corrected1"), ("1", "corrected1"))

# figure -> (goal text, predicate on the value or None, what it measures)
GOALS = {
    **{
        f"startup_{name}_vs_typer_rich": (
            "<= 2",
            lambda v: v <= 2,
            f'`deltakd {shown}` wall time / `python -c "import typer, rich"`, fresh processes',
        )
        for name, shown in (
            ("help", "--help"),
            ("version", "--version"),
            ("config_show", "config show distill"),
        )
    },
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
    "trl_noise_default_minus_trl_heldout_kl": (
        "within +-0.02, CI contains 0",
        None,  # judged with the interval: trl_noise_default_vs_trl_within_noise
        "held-out KL, default cache's KD student minus TRL GKD's (nats/token, >= 5 seeds each)",
    ),
    "trl_noise_default_vs_trl_within_noise": (
        "yes",
        lambda v: bool(v),
        "the 95% interval of default - TRL contains 0 (two-level bootstrap: runs and rows)",
    ),
    "trl_noise_default_vs_trl_ci_half_width": (
        "report",
        None,
        "half-width of that interval: a noisy bench cannot pass by being noisy",
    ),
    "trl_noise_default_better_than_bucket_k64": (
        "yes",
        lambda v: bool(v),
        "the interval of default - top-64 + bucket excludes 0 in the default's favour",
    ),
    "trl_noise_default_bytes_per_response_token": (
        "<= top-64 + bucket",
        None,
        "stored bytes per response token of the default's cache, from its files",
    ),
    "trl_noise_default_kd_end_to_end_vs_trl_1_epoch": (
        ">= 1.3",
        lambda v: v >= 1.3,
        "TRL GKD seconds per 1-epoch run / the default's (cache + distill), means over the runs",
    ),
    "trl_noise_many_students_speedup": (
        ">= 2",
        lambda v: v >= 2,
        "9 KD students (3 seeds x 3 lr): TRL's 9 runs / (one cache + 9 distills), end to end",
    ),
    "trl_noise_many_students_fraction_of_ceiling": (
        ">= 0.9",
        lambda v: v >= 0.9,
        "that speed-up / its amortisation ceiling (TRL time per run / distill time per run)",
    ),
    "trl_noise_many_students_flop_ceiling": (
        "report",
        None,
        "(teacher forward + 3 x student) / (3 x student) FLOPs per token",
    ),
    **{
        f"tail_fidelity_healed_{DEFAULT_SHAPE}_{tail}_gamma{gamma}": (
            ">= 0.97",
            lambda v: v >= 0.97,
            f"one cache's {tail} gradient vs the dense one at S0 (cosine, mean over positions), "
            f"the default cache, gamma {gamma}: the default tail of "
            + ("kd" if gamma == "0" else "delta" if gamma == "1" else "kd-to-delta at 0.5"),
        )
        for gamma, tail in DEFAULT_TAILS
    },
    "trl_paired_default_sampled_minus_trl_heldout_kl": (
        "|x| <= 0.01, CI contains 0",
        None,  # judged with the interval: trl_paired_default_sampled_ci_low / _ci_high
        "held-out KL, KD from the default cache with kd's default tail minus TRL GKD, both "
        "trained on the same batch sequence at each of 5 seeds (nats/token)",
    ),
    "delta_tails_delta_default_corrected_minus_k64_bucket_kl_ci_high": (
        "<= 0 or CI contains 0",
        None,  # judged with delta_tails_delta_default_bucket_minus_k64_bucket_kl and its interval
        "held-out KL to the Delta target, default cache + default tail minus top-64 + bucket, "
        "paired over 3 seeds: not worse when the interval contains 0 or lies below it",
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
    **{
        f"family_grad_cosine_{student}_k64_gamma{gamma}": (
            ">= 0.97",
            lambda v: v >= 0.97,
            f"cosine of the cached kd-to-delta gradient vs the dense one at S0, grid cache "
            f"(stored tail), gamma {gamma}, alpha 1, {student} student",
        )
        for student in ("copied", "healed")
        for gamma in ("0", "0.5", "1")
    },
    "bytes_per_token_k64_student_grid3_extra": (
        "report",
        None,
        "stored bytes per response token a 3-point grid (--gammas 0,0.5,1) adds to a k = 64 "
        "cache with the student (here the student is the base teacher, so every grid point's "
        "target is pT and the grid rule keeps the same ids: the extra is the tails alone)",
    ),
    "bytes_per_token_k64_student_grid3_family_tails": (
        "report",
        None,
        "of which the stored family tails (3 float16 values per position before compression)",
    ),
    "distill_peak_rss_growth": (
        "< 1.1",
        lambda v: v < 1.1,
        "peak RSS with a 10x larger cache / the smaller one",
    ),
    **{
        f"memory_{run}_vs_transformers": (
            "<= 1.1",
            lambda v: v <= 1.1,
            f"peak RSS of deltakd {label}, 2 steps / a plain transformers forward+backward+AdamW "
            "step of the same student and batch (labels, its own loss)",
        )
        for run, label in (
            ("finetune", "finetune"),
            ("distill_kd", "distill --objective kd"),
            ("distill_delta", "distill --objective delta"),
        )
    },
    "memory_lora_distill_vs_full_distill": (
        "<= 0.8",
        lambda v: v <= 0.8,
        "peak RSS of distill kd with --lora-r 16 / the same distill training every weight",
    ),
    "memory_head_152k_extra_vs_one_full_logits": (
        "< 1",
        lambda v: v < 1,
        "a 151,936-token head at 2,048 tokens: (peak RSS of a distill step - the same step with "
        "the head skipped) / one whole [2048 x 151936] float32 tensor (1.16 GiB)",
    ),
    "trl_kd_tokens_per_s_ratio_3_epochs": (
        ">= 1",
        lambda v: v >= 1.0,
        "KD end to end (cache-teachers + distill kd) response tokens/s / TRL GKDTrainer "
        "(lmbda 0, beta 0: forward KL), 3 epochs",
    ),
    "trl_kd_tokens_per_s_ratio_1_epoch": (
        ">= 0.95",
        lambda v: v >= 0.95,
        "the same at 1 epoch (no worse, within timing noise)",
    ),
    **{
        f"trl_kd_peak_rss_ratio_{e}": (
            "report",
            None,
            "peak RSS, deltakd (the larger of its two processes) / TRL (teacher + student)",
        )
        for e in ("1_epoch", "3_epochs")
    },
    **{
        f"trl_kd_heldout_kl_trl_minus_deltakd_{e}": (
            "report",
            None,
            "held-out KL(teacher || student) nats/token, TRL's student - deltakd's",
        )
        for e in ("1_epoch", "3_epochs")
    },
    **{
        f"trl_kd_heldout_kl_equal_within_noise_{e}": (
            "True",
            lambda v: v is True,
            "the 95% paired-bootstrap interval of that difference contains 0",
        )
        for e in ("1_epoch", "3_epochs")
    },
    "trl_kd_heldout_kl_trl_minus_deltakd_over_seeds_1_epoch": (
        "report",
        None,
        "held-out KL, TRL - deltakd, each the mean of 3 students trained at 3 data-order seeds",
    ),
    "trl_kd_heldout_kl_equal_within_noise_over_seeds_1_epoch": (
        "True",
        lambda v: v is True,
        "its 95% interval (bootstrap over the runs of each system and the rows) contains 0",
    ),
    **{
        f"trl_kd_heldout_kl_seed_range_{system}_1_epoch": (
            "report",
            None,
            f"held-out KL, max - min over {system}'s 3 data-order seeds (training-order noise)",
        )
        for system in ("deltakd", "trl")
    },
    "trl_kd_heldout_kl_trl_minus_deltakd_k1024_over_seeds_1_epoch": (
        "report",
        None,
        "the same over 3 data-order seeds each, deltakd's cache at k = 1024",
    ),
    "trl_kd_heldout_kl_equal_within_noise_k1024_over_seeds_1_epoch": (
        "True",
        lambda v: v is True,
        "its 95% interval (runs and rows bootstrap) contains 0",
    ),
    **{
        f"trl_kd_heldout_kl_trl_minus_deltakd_k{k}_1_epoch": (
            "report",
            None,
            f"the first seed's gap with deltakd's cache at k = {k} instead of 64",
        )
        for k in (256, 1024)
    },
    "trl_sft_tokens_per_s_ratio": (
        "report",
        None,
        "deltakd finetune tokens/s / TRL SFTTrainer, same rows, steps and schedule",
    ),
    "trl_sft_peak_rss_ratio": ("report", None, "peak RSS, deltakd finetune / TRL SFTTrainer"),
    "trl_sft_heldout_ce_trl_minus_deltakd": (
        "report",
        None,
        "held-out cross-entropy of the reference, nats/token, TRL's SFT student - deltakd's",
    ),
    "trl_sft_heldout_ce_equal_within_noise": (
        "True",
        lambda v: v is True,
        "the 95% paired-bootstrap interval of that difference contains 0",
    ),
}

TRL_TABLE = "<!-- trl_comparison table -->"


def render_trl(settings: dict | None) -> str:
    """The TRL comparison's run as a table (bench/trl_bench.py's settings), for the notes."""
    if not settings:
        return "(not measured yet: `python bench/run_all.py --only trl`)"
    lines = [
        f"Measured with {settings['models']} models, {settings['train_rows']} rows "
        f"({settings['target_tokens_per_epoch']} target tokens per epoch), batch "
        f"{settings['batch_size']}, TRL {settings['trl']}, "
        f"transformers {settings['transformers']}:",
        "",
        "| run | system | wall s | response tokens/s | deltakd / TRL | peak RSS MiB "
        "| held-out (nats/token) | TRL - deltakd [95% CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def rows(label: str, run: dict, metric: str, deltakd_wall: str) -> None:
        ratio = run["tokens_per_s"]["deltakd"] / run["tokens_per_s"]["trl"]
        quality = run[metric]
        low, high = quality["ci95"]
        interval = f"{quality['trl_minus_deltakd']:+.4f} [{low:+.4f}, {high:+.4f}]"
        for system, wall in (
            ("deltakd", deltakd_wall),
            ("TRL", f"{run['wall_seconds']['trl']:.0f}"),
        ):
            key = system.lower()
            lines.append(
                f"| {label} | {system} | {wall} | {run['tokens_per_s'][key]:.1f} | "
                f"{f'{ratio:.2f}' if key == 'deltakd' else ''} | "
                f"{run['peak_rss_mib'][key]:.0f} | {metric.replace('heldout_', '')} "
                f"{quality[key]:.4f} | {interval if key == 'trl' else ''} |"
            )

    for epochs, run in sorted(settings["kd"].items()):
        stages = run["deltakd_seconds_by_stage"]
        wall = (
            f"{run['wall_seconds']['deltakd']:.0f} "
            f"({stages['cache_teachers']:.0f} + {stages['distill']:.0f})"
        )
        rows(f"KD, {epochs.replace('_', ' ')}", run, "heldout_kl", wall)
    sft = settings["sft"]
    label = f"SFT, {sft['epochs']} epoch{'s' if sft['epochs'] > 1 else ''}"
    rows(label, sft, "heldout_ce", f"{sft['wall_seconds']['deltakd']:.0f}")
    base = settings["heldout_per_token"]
    lines += [
        "",
        f"For scale: the untrained student S0 has held-out KL {base['s0']['kl']:.4f} and "
        f"cross-entropy {base['s0']['ce']:.4f}; the teacher's cross-entropy is "
        f"{base['teacher']['ce']:.4f} nats/token.",
    ]
    return "\n".join(lines)


COMPARISON_TABLE = "<!-- trl_noise table -->"


def end_to_end(trl_seconds: float | None, row: dict) -> str:
    """TRL's seconds per 1-epoch run over deltakd's (cache + distill), both as measured."""
    if not trl_seconds or not row.get("cache_seconds_mean") or not row.get("train_seconds_mean"):
        return ""
    return f"{trl_seconds / (row['cache_seconds_mean'] + row['train_seconds_mean']):.2f}x"


def render_comparison(settings: dict | None) -> str:
    """bench/trl_noise.py's arms and the 9-student row as tables, for the notes."""
    if not settings or "arms" not in settings:
        return "(not measured yet: `python bench/run_all.py --only trl-noise`)"
    lines = [
        f"{len(settings['seeds'])} data-order seeds per arm ({settings['seeds']}), 1 epoch, lr "
        f"{settings['lr']:g}, batch {settings['batch_size']}; {settings['models']} models. "
        f"Best sampled arm: **{settings['best_sampled_arm']}**.",
        "",
        "| arm | k | draws | stored B/token | held-out KL | bucket term | within-tail term "
        "| minus TRL [95% CI] | distill s | cache s | TRL / deltakd, end to end | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    trl_seconds = settings["arms"]["trl"].get("train_seconds_mean")
    comparisons = settings["comparisons"]
    for arm, row in settings["arms"].items():
        versus = comparisons.get(f"{arm}_vs_trl")
        interval = ""
        if versus:  # stored as TRL - arm; shown as arm - TRL
            interval = (
                f"{-versus['difference']:+.4f} [{-versus['ci_high']:+.4f}, "
                f"{-versus['ci_low']:+.4f}]"
            )

        def number(key: str, form: str = ".0f", row: dict = row) -> str:
            value = row.get(key)
            return "" if value is None else format(value, form)

        lines.append(
            f"| {arm} | {number('top_k', 'd')} | {number('tail_samples', 'd')} | "
            f"{number('stored_bytes_per_response_token', '.1f')} | {row['heldout_kl']:.4f} | "
            f"{row['bucket_term']:.4f} | {row['within_tail_term']:.4f} | {interval} | "
            f"{number('train_seconds_mean')} | {number('cache_seconds_mean')} | "
            f"{end_to_end(trl_seconds, row)} | {number('peak_rss_mib_max')} |"
        )
    lines += [
        "",
        "Sampled arms against top-64 + bucket (arm - bucket, 95% CI over runs and rows):",
        "",
    ]
    for key, value in comparisons.items():
        if key.endswith("_vs_bucket_k64"):
            lines.append(
                f"- {key.replace('_vs_bucket_k64', '')}: {value['difference']:+.4f} "
                f"[{value['ci_low']:+.4f}, {value['ci_high']:+.4f}]"
            )
    many = settings.get("many_students")
    if many:
        lines += [
            "",
            f"Many students from one cache: {many['students']} KD students (3 seeds x learning "
            f"rates {settings['many_students_learning_rates']}): TRL {many['trl_seconds']:.0f} s, "
            f"deltakd {many['deltakd_seconds']:.0f} s (one cache + {many['students']} distills): "
            f"**{many['speedup']:.2f}x**, amortisation ceiling {many['amortisation_ceiling']:.2f}x "
            f"({many['fraction_of_ceiling']:.0%} of it); FLOP ceiling "
            f"{many['flop_ceiling']:.2f} ({many['teacher_parameters'] / 1e6:.0f}M teacher, "
            f"{many['student_parameters'] / 1e6:.0f}M student).",
        ]
    return "\n".join(lines)


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
        text = notes.read_text().strip()
        text = text.replace(
            TRL_TABLE, render_trl(results.get("settings", {}).get("trl_comparison"))
        )
        text = text.replace(
            COMPARISON_TABLE, render_comparison(results.get("settings", {}).get("trl_noise"))
        )
        lines += ["", text]
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
