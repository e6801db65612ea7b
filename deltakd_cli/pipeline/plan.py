"""The pipeline's plan: the stages in order, each a deltakd command with typed options, and the
models each role of the final table stands for.

    [init-student] -> [finetune the tuned teacher] -> cache-teachers --student
        [-> cache-teachers of the held-out rows, for the held-out loss]
        -> distill sft, kd, delta (one cache; each once per training seed)
        -> one eval over every model -> the table"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from deltakd_cli.config import stage_option_of
from deltakd_cli.errors import DeltakdError
from deltakd_cli.evaluate.protocol import parse_seeds
from deltakd_cli.method import objectives
from deltakd_cli.method.objectives import OBJECTIVES
from deltakd_cli.option_groups import DataOptions, LoraOptions
from deltakd_cli.options import option_fields
from deltakd_cli.pipeline.options import PipelineOptions
from deltakd_cli.pipeline.stages import Stage, data_key, file_key
from deltakd_cli.pipeline.sweep import SweepPoint, parse_sweep
from deltakd_cli.sources import DataSource
from deltakd_cli.train.options import DistillOptions, validate_lora, validate_push

STUDENT_OBJECTIVES = ("sft", "kd", "delta")
SWEEP_OBJECTIVE = "kd-to-delta"  # the family's objective: one student per point
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


# The pipeline's own options that share a stage option's name but are not the stage's: the
# pipeline pushes one student at its end; no training stage pushes.
PIPELINE_ONLY = ("push_to_hub", "hub_private")
# How --train's rows are read (DataOptions): not how init-student reads its healing text.
ROW_READING = tuple(f.name for f in dataclasses.fields(DataOptions))
# The students' LoRA options: not the tuned teacher's (it trains every weight).
LORA = tuple(f.name for f in dataclasses.fields(LoraOptions))


def unread_defaults(objective: str) -> dict[str, Any]:
    """The settings a student's objective does not read, at their defaults (the pipeline's
    --alpha feeds the delta student and the cache, not the KD student); a student trained by
    cross-entropy alone also keeps lambda at its default."""
    entry = objectives.get(objective)
    unread = {
        name: value
        for name, value in objectives.setting_defaults().items()
        if name not in entry.reads
    }
    if not entry.needs_cache:
        unread["sft_weight"] = next(
            f.default for f in dataclasses.fields(DistillOptions) if f.name == "sft_weight"
        )
    return unread


def check_settings_read(options: PipelineOptions) -> None:
    """A setting the config's distill section gives must be read by some student's objective."""
    given = options.stage_options.get("distill", {})
    reading = {
        name
        for _, _, chosen in students(options)
        for name in objectives.get(chosen["objective"]).reads
    }
    for name in given:
        if name in objectives.setting_fields() and name not in reading:
            readers = ", ".join(objectives.readers_of(name))
            raise DeltakdError(
                f"distill.{name} is read by no student of this pipeline (only by: {readers})"
            )


def _sources(section: str) -> dict[str, str]:
    """Stage option name -> the pipeline field that gives it, for the stage of `section`: the
    field whose config key is `section.name`, else one that feeds the section, else the
    top-level field of that name (PipelineOptions.STAGE_SECTIONS)."""
    stage_fields = {f.name for f in option_fields(PipelineOptions.STAGE_SECTIONS[section])}
    ranked: dict[str, tuple[int, str]] = {}
    for field in dataclasses.fields(PipelineOptions):
        if field.name in PIPELINE_ONLY:
            continue
        own_section, key = stage_option_of(field)
        if own_section == section:
            rank = 0
        elif section in field.metadata.get("feeds", ()):
            rank, key = 1, field.name
        elif own_section is None and field.metadata.get("cli", True):
            rank, key = 2, field.name
        else:
            continue
        if key in stage_fields and rank < ranked.get(key, (3, ""))[0]:
            ranked[key] = (rank, field.name)
    return {name: source for name, (_, source) in ranked.items()}


def stage_options(
    options: PipelineOptions, section: str, *, own: tuple[str, ...] = (), **wired: Any
) -> Any:
    """A stage's options, of its own class: what the pipeline's fields give it (`_sources`),
    then its config section's settings, then `wired`, what the plan itself decides (paths,
    models, seeds); `own` names options left at the stage's default unless its section sets
    them. A section that sets a wired option is refused."""
    cls = PipelineOptions.STAGE_SECTIONS[section]
    settings = options.stage_options.get(section, {})
    clash = sorted(set(settings) & set(wired))
    if clash:
        raise DeltakdError(
            f"{section}.{clash[0]} is set by the pipeline itself for this stage; "
            "remove it from the config"
        )
    given = {
        name: getattr(options, source)
        for name, source in _sources(section).items()
        if name not in own
    }
    return cls(**{**given, **settings, **wired})


def training_rows(options: PipelineOptions) -> dict[str, Any]:
    """Where the training stages read their rows: --train, or the part of it the run kept when
    it held out a validation split (a JSONL file of the same rows: no split, no config)."""
    if options.held_out.get("train"):
        return {"data": options.held_out["train"], "split": None, "data_config": None}
    return {"data": options.train, "split": options.split, "data_config": options.data_config}


def test_rows(options: PipelineOptions) -> dict[str, Any]:
    """Where the final eval reads its rows: --test, or the test rows the run cut from --train
    (--test-rows, --test-fraction; a JSONL file of the same rows: no split, no config)."""
    if options.held_out.get("test"):
        return {"data": options.held_out["test"], "split": None, "data_config": None}
    return {"data": options.test, "split": options.test_split, "data_config": options.data_config}


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


def _held_out_training(options: PipelineOptions, eval_data: str | None) -> dict[str, Any]:
    """The held-out loss options of a training stage (off without held-out data)."""
    if eval_data is None:
        return {"eval_data": None, "eval_every": 0}
    return {"eval_data": eval_data, "eval_every": options.eval_every}


def plan_stages(options: PipelineOptions) -> tuple[list[Stage], dict[str, list[str]]]:
    """The stages in order, and the models of each role (what the table shows): one model per
    role, except the students when they are trained with several seeds."""
    check_settings_read(options)
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
            stage_options(
                options,
                "init_student",
                own=ROW_READING,  # the healing text is read its own way, not as --train is
                source=options.student_from,
                out=str(student_dir),
                work_dir=str(out / "init-student"),
                overwrite=True,
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
        finetune = Stage(
            "finetune the tuned teacher",
            "finetune",
            stage_options(
                options,
                "finetune",
                own=LORA,  # the tuned teacher made here trains every weight
                model=options.teacher_base,
                out=str(tuned_dir),
                **train,
                **_held_out_training(options, validation),
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
            stage_options(
                options,
                "cache",
                teacher_base=roles["teacher-base"],
                teacher_tuned=roles["teacher-tuned"],
                student=roles["student-base"],
                out=str(cache_dir),
                **rows,
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
            distill = stage_options(
                options,
                "distill",
                cache=str(cache_dir),
                student=roles["student-base"],
                out=str(student_out),
                **settings,
                seed=seed,
                **_held_out_training(options, held_out_cache and str(held_out_cache.out)),
                keep_best=options.keep_best and held_out_cache is not None,
            )
            distill = dataclasses.replace(distill, **unread_defaults(objective))
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
        choosing = stage_options(
            options,
            "eval",
            template_from=roles[template_role[options.template_from]],
            model=[model for role in swept for model in role_models[role]],
            data=validation,
            split=None,
            out=str(out / "eval-validation" / "report.json"),
            limit=None,  # every held-out row counts in the choice
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
    test = test_rows(options)
    evaluation = stage_options(
        options,
        "eval",
        template_from=roles[template_role[options.template_from]],
        model=ordered,
        data=test["data"],
        split=test["split"],
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
                "test": data_key(DataSource(test["data"], test["split"], test["data_config"])),
                "models": [base_key, *[s.key for s in stages]],
            },
        )
    )
    return stages, role_models


def check_inputs(options: PipelineOptions) -> None:
    """What the pipeline can check before any stage runs."""
    from deltakd_cli.options import check

    check(options)
    options.refuse_float16_training()
    validate_lora(stage_options(options, "distill", cache="", student="", out=""))
    if (options.student is None) == (options.student_from is None):
        raise DeltakdError("give exactly one of --student and --student-from")
    if options.sweep and options.validation is None and options.validation_fraction <= 0:
        raise DeltakdError(SWEEP_NEEDS_VALIDATION)
    parse_sweep(options.sweep, options.alpha)
    if options.student_from is not None and options.student_layers is None:
        raise DeltakdError("--student-from needs --student-layers")
    cut = [name for name, value in (("--test-rows", options.test_rows),
           ("--test-fraction", options.test_fraction)) if value is not None]  # fmt: skip
    if len(cut) == 2:
        raise DeltakdError("give --test-rows or --test-fraction, not both")
    if (options.test is None) == (not cut):
        raise DeltakdError(
            "give --test, or --test-rows / --test-fraction to cut the test rows from --train"
            if options.test is None
            else f"give --test or {cut[0]}, not both"
        )
    named = [("--train", options.train)]
    if options.test is not None:
        named.append(("--test", options.test))
    if options.validation is not None:
        named.append(("--validation", options.validation))
    for name, spec in named:
        source = DataSource(spec)
        if source.kind not in ("hub", "saved") and not source.path.is_file():
            raise DeltakdError(f"{name} not found: {spec}")
    student_seeds(options)
    validate_push(options.push_to_hub, options.hub_private)
    if options.push_role is not None:
        if options.push_to_hub is None:
            raise DeltakdError("--push-role needs --push-to-hub (the repository)")
        push_role(options)


def check_stages(options: PipelineOptions) -> None:
    """Every stage's options, built as the run will build them, checked as each command checks
    them, before the first stage runs (a value only a later stage refuses, like --lr inf for
    distill, is refused before the tuned teacher is trained). The rows the run will cut from
    --train are stood in for by --train itself: where rows come from checks nothing here."""
    stand_in = dict(options.held_out)
    if options.test is None:
        stand_in.setdefault("test", options.train)
    if options.validation is None and options.validation_fraction > 0:
        stand_in.setdefault("validation", options.train)
    check_planned(plan_stages(dataclasses.replace(options, held_out=stand_in))[0])


def check_planned(stages: list[Stage]) -> None:
    """Each stage's options as its command checks them first; one line naming the stage."""
    from deltakd_cli.options import check
    from deltakd_cli.train.options import validate

    for stage in stages:
        try:
            check(stage.options)
            if stage.command in ("distill", "finetune"):
                validate(stage.options)
        except DeltakdError as error:
            raise DeltakdError(f"{stage.name}: {error}") from None


def push_role(options: PipelineOptions) -> str | None:
    """The role of the student --push-to-hub uploads: --push-role (one the pipeline trains),
    else student-delta, else (with --sweep) None: the point chosen on validation."""
    trained = [role for role, _, _ in students(options)]
    if options.push_role is None:
        return "student-delta" if "student-delta" in trained else None
    if options.push_role not in trained:
        raise DeltakdError(
            f"--push-role {options.push_role}: the pipeline trains no such student "
            f"(it trains {', '.join(trained)})"
        )
    return options.push_role
