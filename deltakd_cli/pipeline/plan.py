"""The pipeline's plan: the stages in order, each a deltakd command with typed options, and the
models each role of the final table stands for.

    [init-student] -> [finetune the tuned teacher] -> cache-teachers --student
        [-> cache-teachers of the held-out rows, for the held-out loss]
        -> distill sft, kd, delta (one cache; each once per training seed)
        -> one eval over every model -> the table"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltakd_cli.cache.options import CacheOptions
from deltakd_cli.errors import DeltakdError
from deltakd_cli.evaluate.options import EvalOptions
from deltakd_cli.evaluate.protocol import parse_seeds
from deltakd_cli.losses import OBJECTIVES
from deltakd_cli.pipeline.options import InitStudentOptions, PipelineOptions
from deltakd_cli.pipeline.stages import Stage, data_key, file_key
from deltakd_cli.pipeline.sweep import SweepPoint, parse_sweep
from deltakd_cli.sources import DataSource
from deltakd_cli.train.options import DistillOptions, FinetuneOptions, validate_lora

STUDENT_OBJECTIVES = ("sft", "kd", "delta")
SWEEP_OBJECTIVE = "kd-to-delta"  # the family's objective (losses.py): one student per point
SWEEP_NEEDS_VALIDATION = (
    "--sweep chooses its point on held-out training rows: give --validation, or keep "
    "--validation-fraction above 0 with enough --train rows"
)
ROLE_LABELS = {
    "teacher-base": "base teacher",
    "teacher-tuned": "tuned teacher",
    "student-base": "base student S0",
    **{f"student-{name}": OBJECTIVES[name].label for name in STUDENT_OBJECTIVES},
}
# The paired differences the table reports: (first, second) is first minus second.
COMPARISONS = (
    ("student-delta", "student-kd"),
    ("student-delta", "student-sft"),
    ("student-kd", "student-sft"),
    ("student-delta", "student-base"),
)


def students(options: PipelineOptions) -> list[tuple[str, str, dict[str, Any]]]:
    """(role, label, distill options) of every student the pipeline trains: sft, kd and delta;
    with --sweep, sft and one kd-to-delta student per point of the grid."""
    points, alphas_swept = parse_sweep(options.sweep, options.alpha)
    if not points:
        return [
            (f"student-{name}", OBJECTIVES[name].label, {"objective": name})
            for name in STUDENT_OBJECTIVES
        ]
    chosen = [("student-sft", OBJECTIVES["sft"].label, {"objective": "sft"})]
    for point in points:
        settings = {"objective": SWEEP_OBJECTIVE, "gamma": point.gamma, "alpha": point.alpha}
        chosen.append((point.role(alphas_swept), point.label(alphas_swept), settings))
    return chosen


def sweep_roles(options: PipelineOptions) -> dict[str, SweepPoint]:
    """The role of each point of --sweep ({} without one)."""
    points, alphas_swept = parse_sweep(options.sweep, options.alpha)
    return {point.role(alphas_swept): point for point in points}


def role_labels(options: PipelineOptions) -> dict[str, str]:
    """Every role of the table, in its order, with its label."""
    labels = {role: ROLE_LABELS[role] for role in ("teacher-base", "teacher-tuned", "student-base")}
    labels.update({role: label for role, label, _ in students(options)})
    return labels


def comparisons(options: PipelineOptions) -> list[tuple[str, str]]:
    """The paired differences the table reports (first minus second). With --sweep: every point
    against SFT and against the KD end of its alpha (gamma 0) when the grid has it."""
    swept = sweep_roles(options)
    if not swept:
        return list(COMPARISONS)
    pairs = [(role, "student-sft") for role in swept]
    for role, point in swept.items():
        kd_end = next(
            (r for r, p in swept.items() if p.gamma == 0 and p.alpha == point.alpha), None
        )
        if kd_end is not None and kd_end != role:
            pairs.append((role, kd_end))
    return pairs


def student_seeds(options: PipelineOptions) -> list[int]:
    """The training seeds of the students: --student-seeds, or just --seed."""
    if options.student_seeds is None:
        return [options.seed]
    return list(parse_seeds(options.student_seeds, "--student-seeds"))


def _training(options: PipelineOptions) -> dict[str, Any]:
    """The training options every student (and a tuned teacher made here) shares."""
    return {
        "batch_size": options.batch_size,
        "grad_accum": options.grad_accum,
        "epochs": options.epochs,
        "lr": options.lr,
        "warmup": options.warmup,
        "seed": options.seed,
        "save_every": options.save_every,
        "dtype": options.dtype,
        "device": options.device,
    }


def _lora(options: PipelineOptions) -> dict[str, Any]:
    """The students' LoRA options (the tuned teacher made here trains every weight)."""
    names = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
    return {name: getattr(options, name) for name in names}


def _load(options: PipelineOptions) -> dict[str, Any]:
    """The model-loading options every stage shares."""
    return {
        "revision": options.revision,
        "trust_remote_code": options.trust_remote_code,
        "attn_implementation": options.attn_implementation,
    }


def _columns(options: PipelineOptions) -> dict[str, Any]:
    """How the training and test rows are read."""
    names = ("data_config", "prompt_field", "response_field", "messages_field", "text_field")
    return {name: getattr(options, name) for name in names}


def training_rows(options: PipelineOptions) -> dict[str, Any]:
    """Where the training stages read their rows: --train, or the part of it the run kept when
    it held out a validation split (a JSONL file of the same rows: no split, no config)."""
    if options.held_out.get("train"):
        return {"data": options.held_out["train"], "split": None, "data_config": None}
    return {"data": options.train, "split": options.split, "data_config": options.data_config}


def validation_rows(options: PipelineOptions) -> str | None:
    """The held-out rows of the held-out loss: --validation, or the split the run made."""
    return options.validation or options.held_out.get("validation")


def _grid(options: PipelineOptions) -> dict[str, Any]:
    """The cache's (gamma, alpha) grid for --sweep: each point's exact tail is stored."""
    swept = sweep_roles(options)
    if not swept:
        return {}
    return {  # the floats themselves: the cache stores exactly the points the students train at
        "gammas": tuple(sorted({point.gamma for point in swept.values()})),
        "alphas": tuple(sorted({point.alpha for point in swept.values()})),
    }


def _eval_options(options: PipelineOptions, **specific: Any) -> EvalOptions:
    """An eval stage's options: the pipeline's protocol, columns and devices, and `specific`
    (models, rows, output, groups)."""
    return EvalOptions(
        **_columns(options),
        **_load(options),
        protocol=options.protocol,
        template=options.template,
        batch_size=options.eval_batch_size,
        seeds=options.seeds,
        max_new_tokens=options.max_new_tokens,
        max_prompt_length=options.max_prompt_length,
        dtype=options.dtype,
        device=options.device,
        **specific,
    )


def _held_out_training(options: PipelineOptions, eval_data: str | None) -> dict[str, Any]:
    """The held-out loss options of a training stage (none without held-out data)."""
    if eval_data is None:
        return {}
    return {"eval_data": eval_data, "eval_every": options.eval_every}


def plan_stages(options: PipelineOptions) -> tuple[list[Stage], dict[str, list[str]]]:
    """The stages in order, and the models of each role (what the table shows): one model per
    role, except the students when they are trained with several seeds."""
    out = options.out_path
    models_dir = out / "models"
    train = training_rows(options)
    train_sha = data_key(DataSource(train["data"], train["split"], train["data_config"]))
    validation = validation_rows(options)
    validation_sha = validation and data_key(DataSource(validation, None, options.data_config))
    stages: list[Stage] = []
    roles = {"teacher-base": options.teacher_base}
    base_key = options.input_keys.get(options.teacher_base, options.teacher_base)

    if options.student is not None:
        roles["student-base"] = options.student
        student_key: Any = options.input_keys.get(options.student, options.student)
    else:
        if options.student_from is None or options.student_layers is None:
            raise DeltakdError("give --student, or --student-from with --student-layers")
        student_dir = models_dir / "student-base"
        init = Stage(
            "init-student",
            "init-student",
            InitStudentOptions(
                source=options.student_from,
                out=str(student_dir),
                work_dir=str(out / "init-student"),
                layers=options.student_layers,
                heal_data=options.heal_data,
                heal_epochs=options.heal_epochs,
                heal_steps=options.heal_steps,
                lr=options.heal_lr,
                batch_size=options.heal_batch_size,
                max_length=options.heal_max_length,
                top_k=options.top_k,
                seed=options.seed,
                dtype=options.dtype,
                device=options.device,
                save_every=options.save_every,
                overwrite=True,
                **_load(options),
            ),
            student_dir,
            "init-student.json",
            distributed=True,
            inputs={
                "source": file_key(options.student_from),
                "heal": options.heal_data and data_key(DataSource(options.heal_data)),
            },
        )
        stages.append(init)
        roles["student-base"] = str(student_dir)
        student_key = init.key

    if options.teacher_tuned is not None:
        roles["teacher-tuned"] = options.teacher_tuned
        tuned_key: Any = options.input_keys.get(options.teacher_tuned, options.teacher_tuned)
    else:
        tuned_dir = models_dir / "teacher-tuned"
        training = {
            **_training(options),
            "epochs": options.finetune_epochs,
            "lr": options.finetune_lr,
            "batch_size": options.finetune_batch_size,
        }
        finetune = Stage(
            "finetune the tuned teacher",
            "finetune",
            FinetuneOptions(
                model=options.teacher_base,
                out=str(tuned_dir),
                template=options.template,
                train_turns=options.train_turns,
                max_length=options.max_length,
                **{**_columns(options), **train},
                **_load(options),
                **training,
                **_held_out_training(options, validation),
                report_to=options.report_to,
            ),
            tuned_dir,
            "run.json",
            distributed=True,
            resumable=True,
            inputs={"train": train_sha, "base": base_key, "validation": validation_sha},
        )
        stages.append(finetune)
        roles["teacher-tuned"] = str(tuned_dir)
        tuned_key = finetune.key

    def cache_stage(name: str, rows: dict[str, Any], cache_dir: Path, rows_key: Any) -> Stage:
        return Stage(
            name,
            "cache-teachers",
            CacheOptions(
                teacher_base=roles["teacher-base"],
                teacher_tuned=roles["teacher-tuned"],
                student=roles["student-base"],
                out=str(cache_dir),
                top_k=options.top_k,
                max_length=options.max_length,
                template=options.template,
                template_from=options.template_from,
                train_turns=options.train_turns,
                **{**_columns(options), **rows},
                alpha=options.alpha,
                dtype=options.dtype,
                device=options.device,
                **_load(options),
                **_grid(options),
            ),
            cache_dir,
            "manifest.json",
            distributed=True,
            inputs={"rows": rows_key, "base": base_key, "tuned": tuned_key, "student": student_key},
        )

    cache = cache_stage("cache-teachers", train, out / "cache", train_sha)
    stages.append(cache)
    cache_dir = cache.out
    held_out_cache = None
    if validation is not None:
        rows = {"data": validation, "split": None, "data_config": options.data_config}
        held_out_cache = cache_stage(
            "cache-teachers (held-out rows)", rows, out / "cache-validation", validation_sha
        )
        stages.append(held_out_cache)

    role_models = {role: [model] for role, model in roles.items()}
    seeds = student_seeds(options)
    for role, _, settings in students(options):
        objective = settings["objective"]
        role_models[role] = []
        for seed in seeds:
            # one seed keeps the plain name; several get a suffix each
            suffix = "" if len(seeds) == 1 else f"-seed{seed}"
            student_out = models_dir / f"{role}{suffix}"
            distill = DistillOptions(
                cache=str(cache_dir),
                student=roles["student-base"],
                out=str(student_out),
                **settings,
                **{**_training(options), "seed": seed},
                **_lora(options),
                **_load(options),
                **_held_out_training(options, held_out_cache and str(held_out_cache.out)),
                keep_best=options.keep_best and held_out_cache is not None,
                report_to=options.report_to,
            )
            if OBJECTIVES[objective].needs_cache:  # cross-entropy alone takes no alpha, no lambda
                distill.alpha = settings.get("alpha", options.alpha)
                distill.sft_weight = options.sft_weight
            what = objective if objective != SWEEP_OBJECTIVE else role.removeprefix("student-")
            stages.append(
                Stage(
                    f"distill {what}" + ("" if len(seeds) == 1 else f" (seed {seed})"),
                    "distill",
                    distill,
                    student_out,
                    "run.json",
                    distributed=True,
                    resumable=True,
                    inputs={
                        "cache": cache.key,
                        "student": student_key,
                        "held_out": held_out_cache and held_out_cache.key,
                    },
                )
            )
            role_models[role].append(str(student_out))

    template_role = {"tuned": "teacher-tuned", "base": "teacher-base", "student": "student-base"}
    swept = sweep_roles(options)
    if swept:
        if validation is None:
            raise DeltakdError(SWEEP_NEEDS_VALIDATION)
        # The sweep's choice: every point scored on the held-out training rows (never test).
        choosing = _eval_options(
            options,
            template_from=roles[template_role[options.template_from]],
            model=[model for role in swept for model in role_models[role]],
            data=validation,
            out=str(out / "eval-validation" / "report.json"),
            group=[f"{role}={','.join(role_models[role])}" for role in swept],
        )
        stages.append(
            Stage(
                "eval on the held-out rows (the sweep's choice)",
                "eval",
                choosing,
                out / "eval-validation",
                "report.json",
                distributed=True,
                inputs={"validation": validation_sha, "models": [s.key for s in stages]},
            )
        )

    eval_dir = out / "eval"
    labels = role_labels(options)
    ordered = [model for role in labels for model in role_models[role]]
    evaluation = _eval_options(
        options,
        template_from=roles[template_role[options.template_from]],
        model=ordered,
        data=options.test,
        split=options.test_split,
        out=str(eval_dir / "report.json"),
        baseline=role_models["student-kd" if "student-kd" in role_models else "student-sft"][0],
        limit=options.eval_limit,
        group=[f"{role}={','.join(role_models[role])}" for role in labels],
        compare=[f"{first}:{second}" for first, second in comparisons(options)],
    )
    stages.append(
        Stage(
            "eval",
            "eval",
            evaluation,
            eval_dir,
            "report.json",
            distributed=True,
            inputs={
                "test": data_key(DataSource(options.test, options.test_split, options.data_config)),
                "models": [base_key, *[s.key for s in stages]],
            },
        )
    )
    return stages, role_models


def check_inputs(options: PipelineOptions) -> None:
    """What the pipeline can check before any stage runs."""
    from deltakd_cli.options import check

    check(options)
    validate_lora(DistillOptions(cache="", student="", out="", **_lora(options)))
    if (options.student is None) == (options.student_from is None):
        raise DeltakdError("give exactly one of --student and --student-from")
    if options.sweep and options.validation is None and options.validation_fraction <= 0:
        raise DeltakdError(SWEEP_NEEDS_VALIDATION)
    parse_sweep(options.sweep, options.alpha)
    if options.student_from is not None and options.student_layers is None:
        raise DeltakdError("--student-from needs --student-layers")
    named = [("--train", options.train), ("--test", options.test)]
    if options.validation is not None:
        named.append(("--validation", options.validation))
    for name, spec in named:
        source = DataSource(spec)
        if source.kind not in ("hub", "saved") and not source.path.is_file():
            raise DeltakdError(f"{name} not found: {spec}")
    student_seeds(options)
