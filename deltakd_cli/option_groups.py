"""The option groups several commands share, each declared once and embedded in every command's
options dataclass that uses it (a mixin): how rows are read, how models are loaded, the device
and precision, the prompt template. Nothing heavy is imported here (the standard library,
options.py, sources.py): the CLI builds every command's flags and help from these without
importing torch."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from deltakd_cli.errors import DeltakdError
from deltakd_cli.options import opt
from deltakd_cli.sources import DataSource

TEMPLATES = ("alpaca", "chat", "plain")
TRAIN_TURNS = ("all", "last")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# A Hugging Face Hub repository id: `name` or `owner/name` (letters, digits, - _ .).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
# The LoRA defaults: every linear projection of a Llama/Qwen/SmolLM-style decoder layer (never the
# output layer or the embeddings, which the frozen S0 and the cache's logits share).
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass(kw_only=True)
class DataOptions:
    """How a `datasets` source is read and which columns hold what (every command that reads
    rows)."""

    PANEL: ClassVar[str] = "Data"

    split: str | None = opt(None, help="Split of a Hub dataset or a saved datasets directory.")
    data_config: str | None = opt(None, help="Configuration (subset) of a Hub dataset.")
    prompt_field: str | None = opt(
        None, help="Column holding the prompt (the instruction, with --context-field)."
    )
    context_field: str | None = opt(
        None, help="Column holding the context or input that goes with the instruction."
    )
    response_field: str | None = opt(None, help="Column holding the response.")
    messages_field: str | None = opt(None, help="Column holding a chat conversation.")
    text_field: str | None = opt(None, help="Column holding plain text (training only).")

    def data_source(self, spec: str, split: str | None = None) -> DataSource:
        """A data option's value as a sources.DataSource (`split` overrides --split)."""
        return DataSource(spec, split if split is not None else self.split, self.data_config)


@dataclass(frozen=True)
class LoadSettings:
    """How models are fetched and built: the Hub revision of a Hub id, whether the repository's
    own code may run (off unless asked: a model repository is code then), the attention kernel."""

    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"

    def hub_kwargs(self, source: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.revision and not source.is_local:
            kwargs["revision"] = self.revision
        # Always explicit: left out, transformers asks on a terminal whether an `auto_map`
        # model's code may run (and runs it on a yes); files are data unless asked otherwise.
        kwargs["trust_remote_code"] = bool(self.trust_remote_code)
        return kwargs

    def check(self, device: Any = None) -> None:
        """Refuse an attention kernel this machine cannot run (`device`: a torch.device)."""
        if self.attn_implementation not in ATTENTION:
            raise DeltakdError(
                f"unknown --attn-implementation '{self.attn_implementation}' "
                f"(choose from {', '.join(ATTENTION)})"
            )
        if self.attn_implementation == "flash_attention_2":
            import importlib.util

            if importlib.util.find_spec("flash_attn") is None:
                raise DeltakdError(
                    "--attn-implementation flash_attention_2 needs the flash-attn package "
                    "(pip install flash-attn) and a CUDA GPU"
                )
            if device is not None and device.type != "cuda":
                raise DeltakdError("--attn-implementation flash_attention_2 runs on CUDA only")


@dataclass(kw_only=True)
class ModelLoadOptions:
    """How models are fetched and built (every command that loads a model)."""

    PANEL: ClassVar[str] = "Model"

    revision: str | None = opt(
        None, help="Hub revision (branch, tag or commit) of the Hub models named by id."
    )
    trust_remote_code: bool = opt(
        False, help="Let Hub models run their repository's own code (off: never silently)."
    )
    attn_implementation: str = opt(
        "sdpa", help="Attention kernel: sdpa, eager, or flash_attention_2 (CUDA, flash-attn).",
        choices=ATTENTION,
    )  # fmt: skip

    def load_settings(self) -> LoadSettings:
        return LoadSettings(self.revision, self.trust_remote_code, self.attn_implementation)


@dataclass(kw_only=True)
class DeviceOptions:
    """Where models run and in which precision (every command that runs a model)."""

    PANEL: ClassVar[str] = "Device and precision"

    dtype: str = opt(
        "auto",
        help="auto (bf16 on GPU), float32, bfloat16, or float16 (inference only).",
        choices=DTYPES,
    )
    device: str = opt("auto", help="auto, cpu, cuda, cuda:N.")

    def refuse_float16_training(self) -> None:
        """Training needs bf16 or fp32: fp16 without loss scaling underflows the gradients."""
        if self.dtype == "float16":
            raise DeltakdError(
                "--dtype float16 is not supported for training (use bfloat16 or float32)"
            )


@dataclass(kw_only=True)
class TemplateOptions:
    """How a row becomes a prompt (every command that renders prompts)."""

    PANEL: ClassVar[str] = "Data"

    template: str = opt("alpaca", help="Prompt template: alpaca, chat or plain.", choices=TEMPLATES)


@dataclass(kw_only=True)
class TrainingTemplateOptions(TemplateOptions):
    """A prompt template, and which turns of a chat row are targets (every command that builds
    training targets)."""

    PANEL: ClassVar[str] = "Data"

    train_turns: str = opt(
        "all", help="Chat rows: targets on every assistant turn, or the last.", choices=TRAIN_TURNS
    )


@dataclass(kw_only=True)
class LoraOptions:
    """Low-rank adapters on a frozen student (every command that trains a student; the
    pipeline's students)."""

    PANEL: ClassVar[str] = "LoRA"

    lora_r: int = opt(
        0, help="LoRA rank: train low-rank adapters on a frozen student (0: train every weight). "
        "Needs pip install 'deltakd[lora]'.", at_least=0,
    )  # fmt: skip
    lora_alpha: float | None = opt(
        None, help="LoRA scale numerator: the update is alpha/r * B A (default 2*r).", above=0,
        finite=True,
    )  # fmt: skip
    lora_dropout: float = opt(0.0, help="Dropout on the LoRA adapters' input.", at_least=0, below=1)
    lora_target_modules: str = opt(
        DEFAULT_LORA_TARGETS,
        help="Linear layers of the decoder layers that get adapters (comma-separated names).",
    )
    lora_4bit: bool = opt(
        False, help="QLoRA: hold the frozen student in 4 bits (CUDA and bitsandbytes).",
        flags=("--lora-4bit",),
    )  # fmt: skip
    save_adapter: bool = opt(
        False, help="Also write the LoRA adapter alone to OUT/adapter (loads with peft).",
        flags=("--save-adapter",),
    )  # fmt: skip

    @property
    def lora_targets(self) -> list[str]:
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]

    @property
    def resolved_lora_alpha(self) -> float:
        """--lora-alpha, or 2*r: the update's scale alpha/r is then 2 whatever the rank."""
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_r


# Minutes a rank waits for the others at a collective under torchrun, per stage: the longest
# wait a healthy run has there. A cache's ranks meet after whole shards (one may end long
# before another), an eval's after each model's generations, a training run's at every step
# and while rank 0 writes a checkpoint or the export.
DIST_TIMEOUT_MINUTES = {
    "cache-teachers": 120.0,
    "eval": 60.0,
    "init-student": 60.0,
    "distill": 30.0,
    "finetune": 30.0,
}


@dataclass(kw_only=True)
class DistributedOptions:
    """How long a process waits for the others under torchrun (every command that starts a
    process group)."""

    PANEL: ClassVar[str] = "Distributed"

    dist_timeout: float | None = opt(
        None,
        help="Minutes a process waits for the others at a collective under torchrun before "
        "stopping (default per command: cache-teachers 120, eval and init-student 60, distill "
        "and finetune 30). A process that waits over a minute says so, once a minute.",
        above=0, finite=True, metavar="MINUTES",
    )  # fmt: skip

    def resolved_dist_timeout(self) -> float:
        """--dist-timeout, or this command's default (DIST_TIMEOUT_MINUTES)."""
        if self.dist_timeout is not None:
            return float(self.dist_timeout)
        return DIST_TIMEOUT_MINUTES[getattr(self, "command", "")]
