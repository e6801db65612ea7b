"""pipeline/plan.py: each stage's options are its own class's, built from the pipeline's fields
and the config's per-stage sections, so every option of every stage can be set from `pipeline`
under one name (the stage's own), and a config cannot unset what the plan wires itself."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml
from conftest import make_rows, write_jsonl
from helpers import assert_one_line_error, run_cli

from deltakd_cli import config
from deltakd_cli.errors import DeltakdError
from deltakd_cli.method.objectives import setting_fields
from deltakd_cli.options import REQUIRED, choices_of, option_fields
from deltakd_cli.pipeline.options import PipelineOptions
from deltakd_cli.pipeline.plan import plan_stages

COMMAND_OF = {
    "init_student": "init-student",
    "finetune": "finetune",
    "cache": "cache-teachers",
    "distill": "distill",
    "eval": "eval",
}
# What the plan itself decides for a stage (paths, models, rows, seeds, the objective of each
# student, the eval's groups): a config section that sets one of these is refused.
WIRED = {
    "init_student": {"source", "out", "work_dir", "overwrite"},
    "finetune": {"model", "out", "data", "split", "data_config", "eval_data", "eval_every"},
    "cache": {"teacher_base", "teacher_tuned", "student", "out", "data", "split", "data_config",
              "gammas", "alphas"},
    "distill": {"cache", "student", "out", "objective", "gamma", "alpha", "seed", "eval_data",
                "eval_every", "keep_best"},
    "eval": {"template_from", "model", "data", "split", "out", "baseline", "limit", "group",
             "compare"},
}  # fmt: skip


def changed(field: dataclasses.Field, hint) -> object:
    """A value of the field's type, within its choices and bounds, other than its default."""
    default = field.default if field.default is not REQUIRED else None
    if field.default_factory is not REQUIRED:
        default = field.default_factory()
    choices = choices_of(field)
    if choices:
        return next(c for c in choices if c != default)
    kind = hint
    if typing.get_origin(hint) in (typing.Union, types_union()):
        kind = next(a for a in typing.get_args(hint) if a is not type(None))
    if kind is bool:
        return not default
    if kind is int:
        return (default or 0) + 3
    if kind is float:
        return 0.125 if default in (None, 0, 0.125) else default * 0.5
    if typing.get_origin(kind) is list:
        return ["first", "second"]
    if typing.get_origin(kind) is tuple:
        return [0.25, 0.75]
    return f"value-of-{field.name}"


def types_union():
    import types

    return types.UnionType


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return {name: str(write_jsonl(root / f"{name}.jsonl", make_rows(6, seed))) for seed, name in
            enumerate(("train", "test", "heal", "validation"))}  # fmt: skip


def planned(rows, tmp_path, sections: dict) -> list:
    """The stages of a pipeline with every stage (init-student, finetune, the training and
    held-out caches, sft/kd/delta, eval) for a config that sets `sections`."""
    path = tmp_path / "pipeline.yaml"
    init = {"source": "src", "layers": 2, "heal_data": rows["heal"]}
    path.write_text(yaml.safe_dump({
        "teacher_base": "tb", "train": rows["train"], "test": rows["test"],
        "out": str(tmp_path / "out"), "validation": rows["validation"],
        **sections, "init_student": {**init, **sections.get("init_student", {})},
    }))  # fmt: skip
    values = config.load(path, "pipeline", PipelineOptions)
    defaults = {f.name: f.default for f in option_fields(PipelineOptions)}
    options = PipelineOptions(**{**{k: v for k, v in defaults.items() if v is not REQUIRED},
                                 **values})  # fmt: skip
    return plan_stages(options)[0]


def test_every_stage_option_is_reachable_from_pipeline_with_one_name(rows, tmp_path):
    """For each stage and each of its options, `SECTION: {NAME: value}` in a pipeline config
    (NAME the stage's own option name) either reaches the stage's options, or, for what the plan
    wires itself, is refused in one line. Nothing is unreachable, nothing has a second name."""
    refused: dict[str, set[str]] = {}
    for section, cls in PipelineOptions.STAGE_SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for field in option_fields(cls):
            value = changed(field, hints[field.name])
            try:
                stages = planned(rows, tmp_path, {section: {field.name: value}})
            except DeltakdError as error:
                if "read by no student of this pipeline" in str(error):
                    # an objective's setting that none of the pipeline's students reads
                    assert section == "distill" and field.name in setting_fields(), error
                    continue
                assert "set by the pipeline itself" in str(error), (section, field.name, error)
                refused.setdefault(section, set()).add(field.name)
                continue
            stage = [s for s in stages if s.command == COMMAND_OF[section]][-1]
            got = getattr(stage.options, field.name)
            expected = tuple(value) if isinstance(got, tuple) else value
            assert got == expected, (section, field.name, got, value)
    assert refused  # the plan's wiring is protected
    for section, names in WIRED.items():
        assert refused.get(section, set()) <= names, (section, refused.get(section))


def test_pipeline_flags_of_a_stage_use_the_stage_option_name():
    """A pipeline flag that sets a stage's option is placed in that stage's config section
    under the stage's own name (`--finetune-lr` is finetune.lr, `--heal-lr` init_student.lr)."""
    for field in dataclasses.fields(PipelineOptions):
        section, key = config.stage_option_of(field)
        stage = PipelineOptions.STAGE_SECTIONS.get(section)
        if stage is None or key in {f.name for f in option_fields(stage)}:
            continue
        assert field.name in {"student_seeds", "sweep"}, (field.name, section, key)


def test_a_stage_setting_reaches_only_its_stage(rows, tmp_path):
    stages = planned(rows, tmp_path, {"cache": {"precision": "float32", "batch_size": 2}})
    caches = [s.options for s in stages if s.command == "cache-teachers"]
    assert caches and all(c.precision == "float32" and c.batch_size == 2 for c in caches)
    init = next(s.options for s in stages if s.command == "init-student")
    assert init.batch_size == 8  # init-student's own default, not the cache's setting


def test_a_stage_setting_of_an_unknown_name_is_one_line(rows, tmp_path):
    with pytest.raises(DeltakdError, match="unknown key 'cache.precison'"):
        planned(rows, tmp_path, {"cache": {"precison": "float32"}})
    with pytest.raises(DeltakdError, match="'distill.temperature' must be a number"):
        planned(rows, tmp_path, {"distill": {"temperature": "warm"}})


def test_each_student_gets_only_the_settings_its_objective_reads(rows, tmp_path):
    """--alpha reaches the delta student (and the cache) but not the kd or sft students, which do
    not read it; a distill setting no student reads is refused in one line."""
    stages = planned(rows, tmp_path, {"alpha": 2.0, "distill": {"sft_weight": 0.2}})
    students = {s.options.objective: s.options for s in stages if s.command == "distill"}
    assert students["delta"].alpha == 2.0 and students["delta"].sft_weight == 0.2
    assert students["kd"].alpha == 1.0 and students["kd"].sft_weight == 0.2
    assert students["sft"].alpha == 1.0 and students["sft"].sft_weight == 0.0
    with pytest.raises(DeltakdError, match="distill.gamma is read by no student"):
        planned(rows, tmp_path, {"distill": {"gamma": 0.5}})


def test_every_stage_is_checked_before_the_first_stage_runs(rows, tmp_path):
    """A value only a stage refuses (distill's finite --lr; a warmup distill's validation
    refuses) stops the pipeline before its first stage (before: finetune and cache-teachers
    ran first)."""
    from deltakd_cli.pipeline.plan import check_inputs, check_stages

    base = PipelineOptions(teacher_base="tb", student="s", train=rows["train"],
                           test=rows["test"], out=str(tmp_path / "out"))  # fmt: skip
    check_stages(base)
    check_inputs(dataclasses.replace(base, lr=float("inf")))  # the pipeline's own checks pass
    with pytest.raises(DeltakdError, match="distill sft: --lr must be a finite number"):
        check_stages(dataclasses.replace(base, lr=float("inf")))
    with pytest.raises(DeltakdError, match="finetune the tuned teacher: --warmup is a fraction"):
        check_stages(dataclasses.replace(base, warmup=2.5))
    cut = dataclasses.replace(base, test=None, test_rows=2, lr=float("inf"))
    with pytest.raises(DeltakdError, match="distill sft: --lr"):  # rows still to be cut
        check_stages(cut)
    result = run_cli(["pipeline", "--teacher-base", "tb", "--student", "s", "--train",
                      rows["train"], "--test", rows["test"], "--out", tmp_path / "out",
                      "--lr", "inf"])  # fmt: skip
    assert_one_line_error(result, "distill sft: --lr must be a finite number")
    assert not (tmp_path / "out").exists()


def test_the_help_says_where_a_pipeline_default_differs_from_the_stage(tmp_path):
    """`sft_weight` 0.5 in pipeline and 0 in distill, epochs 3 and 1: the pipeline's help names
    the stage's own default wherever the two differ."""
    from deltakd_cli.pipeline.plan import _sources

    command = {"init_student": "init-student", "finetune": "finetune", "cache": "cache-teachers",
               "distill": "distill", "eval": "eval"}  # fmt: skip
    pipeline_fields = {f.name: f for f in dataclasses.fields(PipelineOptions)}
    differing = []
    for section, cls in PipelineOptions.STAGE_SECTIONS.items():
        stage_fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, source in _sources(section).items():
            ours, theirs = pipeline_fields[source].default, stage_fields[name].default
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                          for v in (ours, theirs))  # fmt: skip
            if numbers and ours != theirs:
                differing.append(source)
                help_text = pipeline_fields[source].metadata["help"]
                assert f"{command[section]}'s own default is {theirs:g}" in help_text, source
    assert {"sft_weight", "epochs", "finetune_epochs"} <= set(differing)
