"""The pipeline's plan: the stages in order, each a deltakd command with typed options, and the
models each role of the final table stands for.

    [init-student] -> [finetune the tuned teacher] -> cache-teachers --student
        -> distill sft, kd, delta (one cache; each once per training seed)
        -> one eval over every model -> the table"""

from __future__ import annotations

from typing import Any

from deltakd_cli.cache.options import CacheOptions
from deltakd_cli.errors import DeltakdError
from deltakd_cli.evaluate.options import EvalOptions
from deltakd_cli.evaluate.protocol import parse_seeds
from deltakd_cli.losses import OBJECTIVES
from deltakd_cli.pipeline.options import InitStudentOptions, PipelineOptions
from deltakd_cli.pipeline.stages import Stage, data_key, file_key
from deltakd_cli.sources import DataSource
from deltakd_cli.train.options import DistillOptions, FinetuneOptions, validate_lora

STUDENT_OBJECTIVES = ("sft", "kd", "delta")
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


def plan_stages(options: PipelineOptions) -> tuple[list[Stage], dict[str, list[str]]]:
    """The stages in order, and the models of each role (what the table shows): one model per
    role, except the students when they are trained with several seeds."""
    out = options.out_path
    models_dir = out / "models"
    train_sha = data_key(DataSource(options.train, options.split, options.data_config))
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
                data=options.train,
                out=str(tuned_dir),
                template=options.template,
                train_turns=options.train_turns,
                max_length=options.max_length,
                split=options.split,
                **_columns(options),
                **_load(options),
                **training,
            ),
            tuned_dir,
            "run.json",
            distributed=True,
            resumable=True,
            inputs={"train": train_sha, "base": base_key},
        )
        stages.append(finetune)
        roles["teacher-tuned"] = str(tuned_dir)
        tuned_key = finetune.key

    cache_dir = out / "cache"
    cache = Stage(
        "cache-teachers",
        "cache-teachers",
        CacheOptions(
            teacher_base=roles["teacher-base"],
            teacher_tuned=roles["teacher-tuned"],
            student=roles["student-base"],
            data=options.train,
            out=str(cache_dir),
            top_k=options.top_k,
            max_length=options.max_length,
            template=options.template,
            template_from=options.template_from,
            train_turns=options.train_turns,
            split=options.split,
            **_columns(options),
            alpha=options.alpha,
            dtype=options.dtype,
            device=options.device,
            **_load(options),
        ),
        cache_dir,
        "manifest.json",
        distributed=True,
        inputs={"train": train_sha, "base": base_key, "tuned": tuned_key, "student": student_key},
    )
    stages.append(cache)

    role_models = {role: [model] for role, model in roles.items()}
    seeds = student_seeds(options)
    for objective in STUDENT_OBJECTIVES:
        role = f"student-{objective}"
        role_models[role] = []
        for seed in seeds:
            # one seed keeps the plain name; several get a suffix each
            suffix = "" if len(seeds) == 1 else f"-seed{seed}"
            student_out = models_dir / f"{role}{suffix}"
            distill = DistillOptions(
                cache=str(cache_dir),
                student=roles["student-base"],
                out=str(student_out),
                objective=objective,
                **{**_training(options), "seed": seed},
                **_lora(options),
                **_load(options),
            )
            if OBJECTIVES[objective].needs_cache:  # cross-entropy alone takes no alpha, no lambda
                distill.alpha, distill.sft_weight = options.alpha, options.sft_weight
            stages.append(
                Stage(
                    f"distill {objective}" + ("" if len(seeds) == 1 else f" (seed {seed})"),
                    "distill",
                    distill,
                    student_out,
                    "run.json",
                    distributed=True,
                    resumable=True,
                    inputs={"cache": cache.key, "student": student_key},
                )
            )
            role_models[role].append(str(student_out))

    eval_dir = out / "eval"
    ordered = [model for role in ROLE_LABELS for model in role_models[role]]
    template_role = {"tuned": "teacher-tuned", "base": "teacher-base", "student": "student-base"}
    evaluation = EvalOptions(
        model=ordered,
        data=options.test,
        split=options.test_split,
        **_columns(options),
        **_load(options),
        template_from=roles[template_role[options.template_from]],
        out=str(eval_dir / "report.json"),
        protocol=options.protocol,
        template=options.template,
        baseline=role_models["student-kd"][0],
        batch_size=options.eval_batch_size,
        seeds=options.seeds,
        max_new_tokens=options.max_new_tokens,
        max_prompt_length=options.max_prompt_length,
        limit=options.eval_limit,
        group=[f"{role}={','.join(role_models[role])}" for role in ROLE_LABELS],
        compare=[f"{first}:{second}" for first, second in COMPARISONS],
        dtype=options.dtype,
        device=options.device,
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
    if options.student_from is not None and options.student_layers is None:
        raise DeltakdError("--student-from needs --student-layers")
    for name, spec in (("--train", options.train), ("--test", options.test)):
        source = DataSource(spec)
        if source.kind not in ("hub", "saved") and not source.path.is_file():
            raise DeltakdError(f"{name} not found: {spec}")
    student_seeds(options)
