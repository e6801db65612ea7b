"""The options of `deltakd distill` and `deltakd finetune`, written once: the training loop's
own options (TrainOptions), then what each command adds. options.py derives the command line,
the checks and the record from them; `validate` adds the checks that involve several options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from deltakd_cli.errors import DeltakdError
from deltakd_cli.method import objectives
from deltakd_cli.method.spec import TAIL_NAMES
from deltakd_cli.option_groups import (
    DEFAULT_LORA_TARGETS,
    HUB_ID,
    DataOptions,
    DeviceOptions,
    DistributedOptions,
    LoraOptions,
    ModelLoadOptions,
    TrainingTemplateOptions,
)
from deltakd_cli.options import check, opt
from deltakd_cli.tracking import parse_report_to

# Options whose change would make a resumed run differ from the interrupted one (with every
# objective's settings, objectives.py).
OPTIONS_THAT_MATTER = (
    "command",
    "student",
    "source",
    "objective",
    *objectives.setting_fields(),
    "temperature",
    "sft_weight",
    "frozen_student",
    "tail",
    "tail_beta",
    "epochs",
    "max_steps",
    "lr",
    "weight_decay",
    "beta1",
    "beta2",
    "warmup",
    "batch_size",
    "grad_accum",
    "max_tokens_per_batch",
    "max_grad_norm",
    "seed",
    "eval_every",
    "keep_best",
    "compute_dtype",
    "world_size",
    "fsdp",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_4bit",
)


# Options that matter but came after some checkpoints were written: such a checkpoint ran with
# these values (a run without LoRA), so a resume compares against them, not against nothing.
OPTIONS_ADDED_LATER = {
    "lora_r": 0,
    "lora_alpha": None,
    "lora_dropout": 0.0,
    "lora_target_modules": DEFAULT_LORA_TARGETS,
    "lora_4bit": False,
    "tail": None,
    "tail_beta": 1.0,
    **objectives.setting_defaults(),  # a setting added later: runs before it used its default
}

# How the resume check names an option that is not a flag of its own.
OPTION_NAMES = {
    "command": "the command",
    "student": "--student/--model",
    "source": "--cache/--data/--template/--max-length",
    "compute_dtype": "--dtype",
    "world_size": "the number of processes",
    "lora_4bit": "--lora-4bit",
}


@dataclass(kw_only=True)
class TrainOptions(LoraOptions, DeviceOptions, ModelLoadOptions, DistributedOptions):
    """The training loop's options (distill and finetune share them)."""

    command: ClassVar[str] = "train"
    PANELS: ClassVar[dict[str, str]] = {
        **dict.fromkeys(
            ("epochs", "max_steps", "lr", "weight_decay", "beta1", "beta2", "warmup",
             "batch_size", "grad_accum", "max_tokens_per_batch", "max_grad_norm", "seed",
             "gradient_checkpointing", "logit_chunk_size"),
            "Optimisation",
        ),
        **dict.fromkeys(
            ("out", "save_every", "keep_checkpoints", "resume", "overwrite", "log_every",
             "report_to", "push_to_hub", "hub_private"),
            "Output",
        ),
        **dict.fromkeys(("eval_data", "eval_every", "keep_best"), "Held-out loss"),
        "fsdp": "Distributed",
    }  # fmt: skip

    out: str = opt(help="Output: a Hugging Face model directory.", local="output folder")
    epochs: int = opt(1, help="Passes over the data (ignored when --max-steps > 0).", at_least=1)
    max_steps: int = opt(0, help="Optimizer steps; > 0 overrides --epochs.", at_least=0)
    lr: float = opt(2e-5, help="Peak learning rate (AdamW).", above=0, finite=True)
    weight_decay: float = opt(0.0, help="AdamW weight decay (not on biases and norms).", at_least=0)
    beta1: float = opt(0.9, help="AdamW beta1.", at_least=0, below=1)
    beta2: float = opt(0.999, help="AdamW beta2.", at_least=0, below=1)
    warmup: float = opt(
        0.03, help="Linear warmup: steps (>= 1) or a fraction of all steps (< 1).", at_least=0
    )
    batch_size: int | None = opt(
        None, help="Examples per micro-batch (default 8 unless --max-tokens-per-batch is set).",
        at_least=1,
    )  # fmt: skip
    grad_accum: int = opt(1, help="Micro-batches per optimizer step on each process.", at_least=1)
    max_tokens_per_batch: int | None = opt(
        None, help="Padded tokens (rows x longest) per micro-batch; batches by length budget.",
        at_least=1,
    )  # fmt: skip
    max_grad_norm: float = opt(
        1.0, help="Gradient clipping norm; 0 turns clipping off.", at_least=0
    )
    save_every: int = opt(
        500, help="Checkpoint every N steps under OUT/checkpoints (0: never).", at_least=0
    )
    keep_checkpoints: int = opt(2, help="Checkpoints to keep (0: all).", at_least=0)
    resume: bool = opt(
        False, help="Continue from the latest complete checkpoint in OUT.", flags=("--resume",)
    )
    seed: int = opt(0, help="Seed of the batch plan and of torch/numpy/python.")
    gradient_checkpointing: bool = opt(
        False, help="Recompute decoder activations in backward.",
        flags=("--gradient-checkpointing",),
    )  # fmt: skip
    fsdp: bool = opt(
        False, help="Shard the student with FSDP2 (under torchrun).", flags=("--fsdp",)
    )
    logit_chunk_size: int = opt(
        0, help="Target positions per logits chunk (0: about 128 MiB of float32 logits).",
        at_least=0,
    )  # fmt: skip
    log_every: int = opt(1, help="Write a metrics.jsonl line every N steps.", at_least=1)
    eval_data: str | None = opt(
        None,
        help="Held-out data for a held-out loss. distill: a cache of held-out rows (cache-teachers "
        "with the same teachers and student); finetune: held-out rows (the formats of --data).",
    )
    eval_every: int = opt(
        0, help="Held-out loss every N steps and at the end (0: at the end only).", at_least=0
    )
    keep_best: bool = opt(
        False,
        help="Export the weights of the lowest held-out loss instead of the last.",
        flags=("--keep-best",),
    )
    report_to: str = opt(
        "none",
        help="Also log the metrics.jsonl lines and the options to trackers: tensorboard, wandb, "
        "mlflow (comma-separated) or none. Needs pip install 'deltakd[tracking]'.",
    )
    overwrite: bool = opt(
        False, help="Replace a finished run or checkpoints in OUT (only the files deltakd wrote)."
    )
    push_to_hub: str | None = opt(
        None,
        help="Then upload OUT's model files and card (not checkpoints/ or run.json) to this Hub "
        "repository (owner/name; created if missing; needs a token: HF_TOKEN or hf auth login).",
        metavar="REPO",
    )
    hub_private: bool = opt(
        False, help="With --push-to-hub: create the repository private.", flags=("--hub-private",)
    )
    # Set by the program, recorded with the rest: what the run trains on, by content.
    source: dict[str, Any] = opt(default_factory=dict, cli=False)

    def __post_init__(self) -> None:
        if self.batch_size is None and self.max_tokens_per_batch is None:
            self.batch_size = 8


# Every objective's settings (alpha, gamma, mix, beta, ...) as options, from the registry.
ObjectiveOptions = objectives.options_class()


@dataclass(kw_only=True)
class DistillOptions(TrainOptions, ObjectiveOptions):
    """Train the student from the teachers' cache (Delta-KD, KD or SFT); no teacher is loaded.
    Each objective's own settings (--alpha, --gamma, ...) come from objectives.py."""

    command: ClassVar[str] = "distill"
    PANELS: ClassVar[dict[str, str]] = dict.fromkeys(
        ("objective", "sft_weight", "temperature", "frozen_student"), objectives.PANEL
    )

    cache: str = opt(help="Teachers' cache written by cache-teachers.")
    student: str = opt(help="Student S0: HF dir, hub id, or .gguf file.")
    objective: str = opt(
        "delta",
        help="The training objective: "
        + ", ".join(objectives.objective_names())
        + " (docs/method.md).",
        choices=objectives.objective_names,
        metavar="NAME",
    )
    sft_weight: float = opt(
        0.0, help="Weight of cross-entropy on the reference, 0..1.", at_least=0, at_most=1
    )
    temperature: float = opt(
        1.0, help="Softmax temperature of target and student.", above=0, finite=True
    )
    frozen_student: bool = opt(
        False,
        help="Run a frozen copy of the student instead of the cache's S0 log-probs.",
        flags=("--frozen-student",),
    )
    tail: str | None = opt(
        None,
        help="How the target's tail outside the kept ids is trained: bucket (its mass only; "
        "quiet, biased), sampled (the cache's drawn ids; unbiased, noisy) or corrected (the "
        "bucket plus a sampled correction; unbiased). Default: the objective's measured best "
        "when the cache has draws (corrected for the Delta family, sampled for the teacher's), "
        "else bucket (docs/method.md).",
        choices=TAIL_NAMES,
    )
    tail_beta: float = opt(
        1.0,
        help="The corrected tail's baseline scale: 1 the full correction, 0 the plain sampled "
        "tail.",
        at_least=0,
        at_most=1,
    )
    verify_cache: bool = opt(True, help="Check the cache's shard checksums first.")
    num_workers: int = opt(2, help="DataLoader workers reading the cache (0: inline).", at_least=0)


@dataclass(kw_only=True)
class FinetuneOptions(TrainOptions, TrainingTemplateOptions, DataOptions):
    """Supervised finetuning on a JSONL file (e.g. to make the tuned teacher or an SFT
    baseline)."""

    command: ClassVar[str] = "finetune"

    model: str = opt(help="Model to finetune: HF dir, hub id, or .gguf file.")
    data: str = opt(
        help="Rows: JSONL, JSON, parquet, CSV, a datasets directory or a Hub dataset name."
    )
    max_length: int | None = opt(
        None, help="Tokens per training example (default 1024, or the model's limit).", at_least=2
    )
    num_workers: int = opt(0, help="DataLoader workers (0: collate inline).", at_least=0)

    # The training loop reads these of every run; finetuning is cross-entropy only (its
    # objective reads no setting: objectives.setting_values gives their defaults).
    objective: ClassVar[str] = "sft"
    temperature: ClassVar[float] = 1.0
    sft_weight: ClassVar[float] = 0.0
    frozen_student: ClassVar[bool] = False
    tail: ClassVar[str | None] = None
    tail_beta: ClassVar[float] = 1.0

    @property
    def student(self) -> str:
        return self.model


def validate(options: TrainOptions) -> None:
    """Refuse bad numbers before anything is loaded."""
    check(options)
    validate_push(options.push_to_hub, options.hub_private)
    parse_report_to(options.report_to)
    if options.eval_data is None:
        for flag, given in (
            ("--eval-every", options.eval_every),
            ("--keep-best", options.keep_best),
        ):
            if given:
                raise DeltakdError(f"{flag} needs --eval-data (the held-out data)")
    if options.warmup >= 1 and not float(options.warmup).is_integer():
        raise DeltakdError(
            f"--warmup is a fraction (< 1) or a whole number of steps, got {options.warmup}"
        )
    options.refuse_float16_training()
    validate_lora(options)
    objective = objectives.get(options.objective)
    if not objective.takes_temperature and options.temperature != 1.0:
        raise DeltakdError(f"--objective {objective.name} takes no --temperature (use 1)")
    objectives.refuse_unread(objective, objectives.setting_values(options))


def objective_settings(options: TrainOptions) -> Any:
    """The run's objective's own settings (a frozen dataclass of objectives.py)."""
    return objectives.get(options.objective).settings_from(options)


def validate_lora(options: TrainOptions) -> None:
    """The LoRA options: each one needs --lora-r; peft must be installed."""
    if not options.lora_r:
        given = (
            ("--save-adapter", options.save_adapter),
            ("--lora-4bit", options.lora_4bit),
            ("--lora-alpha", options.lora_alpha is not None),
            ("--lora-dropout", options.lora_dropout != 0.0),
            ("--lora-target-modules", options.lora_target_modules != DEFAULT_LORA_TARGETS),
        )
        for flag, is_given in given:
            if is_given:
                raise DeltakdError(f"{flag} needs --lora-r (LoRA is off)")
        return
    if not options.lora_targets:
        raise DeltakdError("--lora-target-modules names no layer")
    try:
        import peft  # noqa: F401
    except ImportError:
        raise DeltakdError("--lora-r needs peft: pip install 'deltakd[lora]'") from None


@dataclass(kw_only=True)
class PushOptions:
    """Upload a model directory to the Hugging Face Hub: its model files, its card (README.md)
    and its adapter/ directory; never checkpoints/, run.json or metrics.jsonl."""

    command: ClassVar[str] = "push"

    dir: str = opt(
        help="The model directory (the OUT of distill or finetune, its adapter/, or any Hugging "
        "Face model directory).",
        argument=True,
        metavar="DIR",
        local="input folder",
    )
    repo: str = opt(
        help="The Hub repository (owner/name), created if missing. The token: HF_TOKEN or "
        "hf auth login.",
        argument=True,
        metavar="REPO",
    )
    private: bool = opt(
        False, help="Create the repository private (when it does not exist yet).",
        flags=("--private",),
    )  # fmt: skip


MAX_REPO_ID = 96  # characters the Hub allows in a repository id


def check_repo_id(repo: str, flag: str) -> None:
    """Refuse a repository id the Hub would refuse, before anything is trained."""
    if len(repo) > MAX_REPO_ID or not HUB_ID.match(repo) or ".." in repo or "--" in repo:
        raise DeltakdError(
            f"{flag} {repo!r} is not a Hub repository id (owner/name: letters, digits, - _ .)"
        )


def validate_push(repo: str | None, private: bool) -> None:
    """--push-to-hub REPO names a repository the Hub accepts; --hub-private needs it."""
    if repo is None:
        if private:
            raise DeltakdError("--hub-private needs --push-to-hub (the repository)")
        return
    check_repo_id(repo, "--push-to-hub")
