"""The one training loop for `deltakd distill` and `deltakd finetune` (torchtune-recipe style: an
explicit loop, no HF Trainer).

Loss normalisation: an optimizer step sums the per-position losses of all its micro-batches on all
ranks and divides by the number of target tokens of the whole step (known in advance from the
batch plan). Each rank backpropagates `sum of its losses * world_size / global targets`; DDP (and
FSDP2) average gradients over ranks, which cancels the world_size factor, so the update is the
same however the step is split into micro-batches or ranks.

Logits: the student's decoder runs once; its hidden states at the N target positions are gathered
and pushed through the output layer in chunks of positions, each chunk under activation
checkpointing, so only one chunk's [n, V] logits exist at a time (forward and backward).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import TextColumn
from torch import nn
from torch.utils.checkpoint import checkpoint

from deltakd_cli import __version__, batching, data, distributed, faults, losses, models, outputs
from deltakd_cli.console import console, info, progress
from deltakd_cli.errors import DeltakdError, Interrupted

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
EXPORT_FILE_ORDER_LAST = ("config.json",)  # moved last: before it arrives, OUT does not load
LOGIT_ELEMENTS_PER_CHUNK = 1 << 25  # ~128 MiB of float32 logits per chunk by default

# Options whose change would make a resumed run differ from the interrupted one.
OPTIONS_THAT_MATTER = (
    "command",
    "student",
    "source",
    "objective",
    "alpha",
    "temperature",
    "sft_weight",
    "mix",
    "no_cached_student",
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
    "compute_dtype",
    "world_size",
    "fsdp",
)

# How the resume check names an option that is not a flag of its own.
OPTION_NAMES = {
    "command": "the command",
    "student": "--student/--model",
    "source": "--cache/--data/--template/--max-length",
    "compute_dtype": "--dtype",
    "world_size": "the number of processes",
}


@dataclass
class TrainOptions:
    """Every option of a training run (distill and finetune share them)."""

    out: str
    student: str
    command: str = "distill"
    source: dict[str, Any] = field(default_factory=dict)  # the data: cache or JSONL settings
    objective: str = "sft"
    alpha: float = 1.0
    temperature: float = 1.0
    sft_weight: float = 0.0
    mix: float = 0.5
    no_cached_student: bool = False
    epochs: int = 1
    max_steps: int = 0  # > 0 overrides --epochs
    lr: float = 2e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup: float = 0.03  # >= 1: steps; < 1: fraction of all steps
    batch_size: int | None = 8
    grad_accum: int = 1
    max_tokens_per_batch: int | None = None
    max_grad_norm: float = 1.0  # 0: no clipping
    save_every: int = 500  # 0: no intermediate checkpoints
    keep_checkpoints: int = 2  # 0: keep all
    resume: bool = False
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    gradient_checkpointing: bool = False
    fsdp: bool = False
    num_workers: int = 2
    logit_chunk_size: int = 0  # target positions per logits chunk; 0: from the vocabulary size
    log_every: int = 1
    verify_cache: bool = True
    overwrite: bool = False  # replace a finished run or checkpoints in OUT (only deltakd's files)


def validate(options: TrainOptions) -> None:
    """Refuse bad numbers before anything is loaded."""

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise DeltakdError(message)

    if options.objective not in losses.OBJECTIVES:
        choices = ", ".join(losses.OBJECTIVES)
        raise DeltakdError(f"unknown --objective '{options.objective}' (choose from {choices})")
    need(math.isfinite(options.lr) and options.lr > 0, f"--lr must be > 0, got {options.lr}")
    need(
        0.0 <= options.sft_weight <= 1.0,
        f"--sft-weight must be between 0 and 1, got {options.sft_weight}",
    )
    need(
        math.isfinite(options.temperature) and options.temperature > 0,
        f"--temperature must be > 0, got {options.temperature}",
    )
    need(math.isfinite(options.alpha), f"--alpha must be a finite number, got {options.alpha}")
    need(0.0 <= options.mix <= 1.0, f"--mix must be between 0 and 1, got {options.mix}")
    need(options.epochs >= 1, f"--epochs must be at least 1, got {options.epochs}")
    need(options.max_steps >= 0, f"--max-steps must be >= 0, got {options.max_steps}")
    need(options.weight_decay >= 0, f"--weight-decay must be >= 0, got {options.weight_decay}")
    for name, beta in (("--beta1", options.beta1), ("--beta2", options.beta2)):
        need(0.0 <= beta < 1.0, f"{name} must be in [0, 1), got {beta}")
    need(options.warmup >= 0, f"--warmup must be >= 0, got {options.warmup}")
    need(
        options.warmup < 1 or float(options.warmup).is_integer(),
        f"--warmup is a fraction (< 1) or a whole number of steps, got {options.warmup}",
    )
    need(
        options.batch_size is None or options.batch_size >= 1,
        f"--batch-size must be at least 1, got {options.batch_size}",
    )
    need(options.grad_accum >= 1, f"--grad-accum must be at least 1, got {options.grad_accum}")
    need(
        options.max_tokens_per_batch is None or options.max_tokens_per_batch >= 1,
        f"--max-tokens-per-batch must be at least 1, got {options.max_tokens_per_batch}",
    )
    need(options.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {options.max_grad_norm}")
    need(options.save_every >= 0, f"--save-every must be >= 0, got {options.save_every}")
    need(options.keep_checkpoints >= 0, "--keep-checkpoints must be >= 0")
    need(options.num_workers >= 0, f"--num-workers must be >= 0, got {options.num_workers}")
    need(options.logit_chunk_size >= 0, "--logit-chunk-size must be >= 0")
    need(options.log_every >= 1, f"--log-every must be at least 1, got {options.log_every}")
    if options.dtype not in models.DTYPES:
        raise DeltakdError(
            f"unknown --dtype '{options.dtype}' (choose from {', '.join(models.DTYPES)})"
        )
    need(
        options.dtype != "float16",
        "--dtype float16 is not supported for training (use bfloat16 or float32)",
    )
    if options.objective == "delta-mse":
        need(options.temperature == 1.0, "--objective delta-mse takes no --temperature (use 1)")


# ----------------------------------------------------------------------------- the data


@dataclass
class TrainingData:
    """What to train on: a store of examples plus what run.json says about where it came from."""

    store: batching.ExampleStore
    provenance: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)  # what a resume must find unchanged
    cache_alpha: float | None = None
    use_cached_student: bool = False  # read and use the cache's S0 log-probs
    needs_frozen_student: bool = False  # run a frozen copy of the initial student


def finetune_data(path: str, template: str, max_length: int, tokenizer: Any) -> TrainingData:
    """JSONL rows -> tokenised examples in memory, grouped by length like a cache shard."""
    examples = data.load_examples(path)
    tokenized = data.tokenize_all(examples, template, tokenizer, max_length)
    data_sha = data.file_sha256(path)
    return TrainingData(
        store=batching.TokenizedStore(tokenized),
        source={
            "data": str(path),
            "data_sha256": data_sha,
            "template": template,
            "max_length": max_length,
        },
        provenance={
            "data": {"path": str(Path(path).resolve()), "sha256": data_sha},
            "template": template,
            "max_length": max_length,
            "examples": len(tokenized),
            "truncated": sum(t.truncated for t in tokenized),
        },
    )


def distill_data(
    cache_path: str, student: str, tokenizer: Any, options: TrainOptions
) -> TrainingData:
    """Open and check a cache against the student and the objective."""
    from deltakd_cli.cache import CacheReader

    reader = CacheReader(cache_path)
    reader.check_structure()
    if options.verify_cache:
        damaged = reader.verify()
        if damaged:
            raise DeltakdError(
                f"cache {cache_path} fails verification (shards changed since they were written: "
                f"{', '.join(damaged)}); rebuild it with cache-teachers"
            )
    manifest = reader.manifest
    provenance = manifest.get("provenance", {})
    teacher = provenance.get("teacher_tuned") or {}
    cache_tokenizer = teacher.get("tokenizer_sha256")
    if cache_tokenizer != models.tokenizer_fingerprint(tokenizer):
        raise DeltakdError(
            f"tokenizer mismatch: the student {student} does not share the tokenizer the cache "
            f"{cache_path} was built with (teacher {teacher.get('spec', '?')}); the student must "
            "use the teachers' vocabulary"
        )
    if int(manifest["vocab_size"]) != models.tokenizer_vocab_size(tokenizer):
        raise DeltakdError(
            f"vocabulary mismatch: the cache has {manifest['vocab_size']} tokens, the student's "
            f"tokenizer {models.tokenizer_vocab_size(tokenizer)}"
        )
    needs_cache = losses.objective_needs_cache(options.objective)
    uses_student_target = losses.objective_needs_frozen_student(options.objective, False)
    use_cached_student = (
        needs_cache and uses_student_target and reader.has_student and not options.no_cached_student
    )
    if use_cached_student:
        cached_student = provenance.get("student") or {}
        if cached_student.get("weights_sha256") != models.weights_fingerprint(student):
            raise DeltakdError(
                f"the cache holds the log-probs of another student ({cached_student.get('spec')}), "
                f"not of {student}: rebuild the cache with --student {student}, or pass "
                "--frozen-student to run a frozen copy of the student instead"
            )
    needs_frozen = needs_cache and losses.objective_needs_frozen_student(
        options.objective, use_cached_student
    )
    alpha = manifest.get("alpha")
    local = Path(cache_path).exists()
    return TrainingData(
        store=reader,
        source={"cache": str(cache_path), "manifest_sha256": manifest["manifest_sha256"]},
        provenance={
            "cache": {
                "path": str(Path(cache_path).resolve()) if local else cache_path,
                "format_version": manifest.get("format_version"),
                "k": manifest.get("k"),
                "selection": manifest.get("selection"),
                "tail_rule": manifest.get("tail_rule"),
                "alpha": alpha,
                "has_student": manifest.get("has_student"),
                "precision": manifest.get("precision"),
                "counts": manifest.get("counts"),
                "manifest_sha256": manifest["manifest_sha256"],
            },
            "cache_provenance": provenance,
        },
        cache_alpha=None if alpha is None else float(alpha),
        use_cached_student=use_cached_student,
        needs_frozen_student=needs_frozen,
    )


# ----------------------------------------------------------------------------- the model side


def decoder_of(model: nn.Module) -> nn.Module:
    """The model without its output layer (hidden states out)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    if decoder is None or decoder is model:
        raise DeltakdError(
            f"{type(model).__name__}: cannot find the decoder (hidden states before the output "
            "layer); this architecture is not supported"
        )
    return decoder


def output_logits(model: nn.Module, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The model's logits [n, vocab_size] for hidden states [n, H], sliced to the working
    vocabulary (padded output layers have extra rows)."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config
    scale = getattr(config, "logit_scale", None)  # e.g. Cohere
    if scale:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)  # e.g. Gemma 2
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits[:, :vocab_size]


def target_hidden(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Hidden states [N, H] at the batch's target positions."""
    outputs = decoder_of(model)(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    return outputs.last_hidden_state[batch["target_batch"], batch["target_pos"]]


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant: works under DDP and FSDP2)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def default_chunk_size(vocab_size: int) -> int:
    return max(1, LOGIT_ELEMENTS_PER_CHUNK // vocab_size)


class ObjectiveModule(nn.Module):
    """The student plus its loss: forward(batch) -> sums over the batch's target positions of
    (loss, sft, distill). This is the module DDP/FSDP2 wrap, so their hooks see every use of the
    student's parameters. A frozen S0, when needed, is a submodule whose parameters need no grad."""

    def __init__(
        self,
        student: nn.Module,
        options: TrainOptions,
        vocab_size: int,
        compute_dtype: torch.dtype,
        frozen_student: nn.Module | None = None,
        cache_alpha: float | None = None,
    ):
        super().__init__()
        self.student = student
        self.frozen_student = frozen_student
        self.objective = options.objective
        self.vocab_size = vocab_size
        self.chunk_size = options.logit_chunk_size or default_chunk_size(vocab_size)
        self.compute_dtype = compute_dtype
        self.loss_options = {
            "alpha": options.alpha,
            "temperature": options.temperature,
            "sft_weight": options.sft_weight,
            "cache_alpha": cache_alpha,
            "mix": options.mix,
        }

    def _chunk_sums(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        cached: Any,
        frozen_hidden: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = output_logits(self.student, hidden, self.vocab_size)
        frozen_logits = None
        if frozen_hidden is not None:
            with torch.no_grad():
                frozen_logits = output_logits(self.frozen_student, frozen_hidden, self.vocab_size)
        parts = losses.objective_loss(
            self.objective,
            logits,
            labels,
            cached,
            frozen_student_logits=frozen_logits,
            **self.loss_options,
        )
        return parts["loss"].sum(), parts["sft"].detach().sum(), parts["distill"].detach().sum()

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        device = batch["input_ids"].device
        autocast = torch.autocast(
            device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32
        )
        with autocast:
            hidden = target_hidden(self.student, batch)
            frozen_hidden = None
            if self.frozen_student is not None:
                with torch.no_grad():
                    frozen_hidden = target_hidden(self.frozen_student, batch)
            labels, cached = batch["labels"], batch["cached"]
            count = hidden.shape[0]
            sums = []
            for start in range(0, count, self.chunk_size):
                rows = slice(start, min(start + self.chunk_size, count))
                arguments = (
                    hidden[rows],
                    labels[rows],
                    None if cached is None else cached[rows],
                    None if frozen_hidden is None else frozen_hidden[rows],
                )
                if count > self.chunk_size:
                    # Recompute this chunk's logits in backward instead of keeping them.
                    sums.append(
                        torch.stack(checkpoint(self._chunk_sums, *arguments, use_reentrant=False))
                    )
                else:
                    sums.append(torch.stack(self._chunk_sums(*arguments)))
        return torch.stack(sums).sum(dim=0)  # [3]: loss, sft, distill


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    moved = dict(batch)
    for name in ("input_ids", "attention_mask", "target_batch", "target_pos", "labels"):
        moved[name] = batch[name].to(device, non_blocking=True)
    if batch["cached"] is not None:
        moved["cached"] = batch["cached"].to(device)
    return moved


def _sync_context(wrapped: nn.Module, sync: bool) -> Any:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if sync:
        return nullcontext()
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
    return nullcontext()


def accumulate_gradients(
    wrapped: nn.Module,
    micro_batches: list[dict[str, Any]],
    global_targets: int,
    world_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Forward and backward every micro-batch of one optimizer step on this rank; gradients end
    up as d(sum of all per-position losses of the step on all ranks)/d(theta) / global_targets.
    Returns this rank's [loss, sft, distill] sums (not yet normalised)."""
    scale = world_size / global_targets  # DDP/FSDP2 divide by world_size when they average
    totals = torch.zeros(3, device=device)
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        if last and hasattr(wrapped, "set_requires_gradient_sync"):
            wrapped.set_requires_gradient_sync(True)
        with _sync_context(wrapped, last):
            sums = wrapped(batch_to(batch, device))
            (sums[0] * scale).backward()
        totals += sums.detach().float()
    return totals


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to the peak over `warmup_steps` steps, then cosine decay towards 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps_of(warmup: float, total_steps: int) -> int:
    return int(warmup) if warmup >= 1 else int(round(warmup * total_steps))


def make_optimizer(module: nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    """AdamW; with weight decay, biases and norm weights (1-d parameters) are not decayed."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    decayed = [p for p in trainable if p.dim() >= 2]
    plain = [p for p in trainable if p.dim() < 2]
    groups = [
        {"params": decayed, "weight_decay": options.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=options.lr, betas=(options.beta1, options.beta2)
    )


# ----------------------------------------------------------------------------- checkpoints


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first. Partial ones live under a dotted
    temp name until renamed, so they never match."""
    directory = out / "checkpoints"
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and numbers only (a checkpoint holds no Python objects)."""
    _, numpy_key, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_state, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(numpy_key.astype(np.int64)),
        "numpy_pos": int(numpy_pos),
        "numpy_has_gauss": int(numpy_has_gauss),
        "numpy_gauss": float(numpy_gauss),
        "python_version": int(python_version),
        "python_state": torch.tensor(python_state, dtype=torch.int64),
        "python_gauss": python_gauss,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_key = state["numpy_key"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", numpy_key, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"])
    )
    python_state = tuple(int(v) for v in state["python_state"].tolist())
    random.setstate((state["python_version"], python_state, state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_tensors(path: Path) -> Any:
    """A checkpoint file as data: torch.load with weights_only=True, which refuses anything but
    tensors, numbers, strings and containers of them (a pickle that would run code is refused,
    never run)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DeltakdError(f"checkpoint file missing: {path}") from None
    except Exception as error:  # UnpicklingError and friends: not plain data
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DeltakdError(
            f"{path}: not a plain-data checkpoint (refused, nothing in it was run): {first}"
        ) from None


def save_tensors(value: Any, path: Path) -> None:
    faults.point(f"checkpoint {path.name}")
    torch.save(value, path)


def _state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: what a checkpoint file needs on disk."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


# What a training run writes into OUT besides the exported model files (recorded in the
# output marker as they are written): what --overwrite removes, and nothing else.
RUN_FILES = ("checkpoints", "metrics.jsonl", "run.json", ".export.partial")


def _resume_mismatch(name: str, path: Path, was: Any, identity: dict[str, Any]) -> str:
    now = identity[name]
    if name == "source" and isinstance(was, dict) and isinstance(now, dict):
        if "manifest_sha256" in now and was.get("cache") == now.get("cache"):
            return (
                f"--resume: the cache {now['cache']} changed since {path.name} (its manifest "
                "checksum differs: it was rebuilt); resume needs the same cache, or start a new "
                "--out"
            )
        if "data_sha256" in now and was.get("data") == now.get("data"):
            if was.get("data_sha256") != now.get("data_sha256"):
                return (
                    f"--resume: the data file {now['data']} changed since {path.name} (its "
                    "sha256 differs); resume needs the same data, or start a new --out"
                )
    flag = OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
    return (
        f"--resume: {flag} changed since {path.name} (was {was!r}, now {now!r}); resume with "
        "the same options or start a new --out"
    )


class Trainer:
    """One training run: set up, optionally resume, loop, export."""

    def __init__(self, options: TrainOptions, training_data: TrainingData, tokenizer: Any):
        self.options = options
        self.data = training_data
        self.tokenizer = tokenizer
        self.out = Path(options.out)
        self.rank = distributed.rank()
        self.world_size = distributed.world_size()
        self.device = distributed.device_for(options.device)
        self.compute_dtype = models.resolve_dtype(options.dtype, self.device)
        self.identity = self._identity()
        self.lock: outputs.OutputLock | None = None

    # -- setup --------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        values = dataclasses.asdict(self.options)
        values["compute_dtype"] = str(self.compute_dtype).replace("torch.", "")
        values["world_size"] = self.world_size
        return {name: values[name] for name in OPTIONS_THAT_MATTER}

    def check_output(self) -> tuple[int, Path] | None:
        """(rank 0, lock held) The checkpoint to resume from, or None for a fresh start; refuse
        what cannot work: a directory that is not a training run, a finished run, checkpoints
        without --resume (each unless --overwrite)."""
        options = self.options
        claim = outputs.claim_directory(
            self.out,
            "training-run",
            "training run",
            options.overwrite,
            legacy=("run.json", "checkpoints"),
        )
        if claim == "ours" and options.overwrite:
            marker = outputs.read_marker(self.out) or {}
            outputs.remove_own_files(self.out, [*RUN_FILES, *marker.get("files", [])])
            outputs.write_marker(self.out, "training-run")
            return None
        if (self.out / "run.json").exists():
            raise DeltakdError(
                f"{self.out} already holds a finished run (run.json); choose another --out, or "
                "pass --overwrite to replace it"
            )
        found = complete_checkpoints(self.out)
        if options.resume:
            if not found:
                raise DeltakdError(
                    f"--resume: no complete checkpoint under {self.out}/checkpoints; "
                    "drop --resume to start the run"
                )
            step, path = found[-1]
            saved = json.loads((path / "state.json").read_text())["options"]
            for name in OPTIONS_THAT_MATTER:
                if saved.get(name) != self.identity[name]:
                    raise DeltakdError(_resume_mismatch(name, path, saved.get(name), self.identity))
            return step, path
        if found:
            raise DeltakdError(
                f"{self.out} has checkpoints of an earlier run: pass --resume to continue it, "
                "--overwrite to start again, or choose another --out"
            )
        return None

    def build(self) -> None:
        options = self.options
        torch.manual_seed(options.seed)
        np.random.seed(options.seed)
        random.seed(options.seed)
        load_device = torch.device("cpu") if options.fsdp else self.device
        student = models.load_model(options.student, torch.float32, load_device)
        self.vocab_size = models.check_model_vocab(student, self.tokenizer, "student")
        self.export_dtype = models.stored_dtype(options.student)
        frozen = None
        if self.data.needs_frozen_student:
            frozen = copy.deepcopy(student)
            frozen.requires_grad_(False)
            frozen.eval()
            if not options.fsdp:  # FSDP2 keeps one dtype per group; it casts via its policy
                frozen.to(self.compute_dtype)
        if options.gradient_checkpointing:
            enable_activation_checkpointing(student)
        student.config.use_cache = False
        student.train()
        self.student = student
        self.module = ObjectiveModule(
            student, options, self.vocab_size, self.compute_dtype, frozen, self.data.cache_alpha
        )
        if options.fsdp:
            self.wrapped = self._fully_shard(self.module)
        elif self.world_size > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        else:
            self.wrapped = self.module
        self.plan = batching.RunPlan(
            [self.data.store.shard_lengths(s) for s in range(self.data.store.num_shards)],
            seed=options.seed,
            batch_size=options.batch_size,
            max_tokens=options.max_tokens_per_batch,
            world_size=self.world_size,
            grad_accum=options.grad_accum,
            epochs=options.epochs,
            max_steps=options.max_steps or None,
        )
        self.total_steps = self.plan.total_steps
        self.warmup_steps = warmup_steps_of(options.warmup, self.total_steps)
        self.optimizer = make_optimizer(self.module, options)
        total, warmup = self.total_steps, self.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup, total)
        )

    def _fully_shard(self, module: ObjectiveModule) -> nn.Module:
        """FSDP2: every decoder layer is its own unit; the root unit (module) holds embeddings,
        final norm and output layer, which stay gathered for the whole forward."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        for model in (module.student, module.frozen_student):
            if model is None:
                continue
            layers = getattr(decoder_of(model), "layers", None)
            if layers is None:
                raise DeltakdError(f"--fsdp: {type(model).__name__} has no decoder layers list")
            for layer in layers:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        return module

    # -- state --------------------------------------------------------------------------------

    def _model_state(self) -> dict[str, torch.Tensor]:
        """The student's full state dict (gathered under FSDP2; CPU tensors)."""
        if self.options.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            full = get_model_state_dict(
                self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            return {k[len("student.") :]: v for k, v in full.items() if k.startswith("student.")}
        return {k: v.detach().cpu() for k, v in self.student.state_dict().items()}

    def _load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.options.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            set_model_state_dict(
                self.module,
                {f"student.{k}": v for k, v in state.items()},
                options=StateDictOptions(full_state_dict=True, strict=False),
            )
        else:
            self.student.load_state_dict(state)

    def _optimizer_state(self) -> dict[str, Any]:
        if self.options.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            return get_optimizer_state_dict(
                self.module,
                self.optimizer,
                options=StateDictOptions(full_state_dict=True, cpu_offload=True),
            )
        return self.optimizer.state_dict()

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        if self.options.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(
                self.module,
                self.optimizer,
                state,
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            self.optimizer.load_state_dict(state)

    def save_checkpoint(self, step: int) -> Path:
        """OUT/checkpoints/step-N, written under a temp name and renamed when complete. Only
        tensors and plain data: model and optimizer state and RNG states as tensors (loaded back
        with weights_only=True), the scheduler and the position as JSON."""
        final = self.out / "checkpoints" / f"step-{step}"
        partial = self.out / "checkpoints" / f".step-{step}.partial"
        model_state = self._model_state()
        optimizer_state = self._optimizer_state()
        needed = 2 * _state_bytes(model_state) + _state_bytes(optimizer_state)
        with outputs.writing(partial, needed):
            if self.rank == 0:
                if partial.exists():
                    shutil.rmtree(partial)
                partial.mkdir(parents=True)
            distributed.barrier()
            save_tensors(_rng_state(), partial / f"rng-rank{self.rank}.pt")
            if self.rank == 0:
                save_tensors(model_state, partial / "model.pt")
                save_tensors(optimizer_state, partial / "optimizer.pt")
                trainer_state = {"scheduler": self.scheduler.state_dict()}
                outputs.atomic_write_text(partial / "trainer.json", json.dumps(trainer_state))
            distributed.barrier()
            if self.rank == 0:
                epoch, within = self.plan.locate(step)
                state = {
                    "step": step,
                    "epoch": epoch,
                    "step_in_epoch": within,
                    "total_steps": self.total_steps,
                    "options": self.identity,
                    "version": __version__,
                }
                outputs.atomic_write_text(partial / "state.json", json.dumps(state, indent=2))
                faults.point("checkpoint rename")
                partial.rename(final)
                if self.options.keep_checkpoints:
                    for _, old in complete_checkpoints(self.out)[: -self.options.keep_checkpoints]:
                        shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()
        return final

    def load_checkpoint(self, path: Path) -> int:
        state = json.loads((path / "state.json").read_text())
        trainer_file = path / "trainer.json"
        if not trainer_file.is_file():
            raise DeltakdError(
                f"{path} was written by an older deltakd (no trainer.json) and cannot be "
                "resumed; start a new --out"
            )
        self._load_model_state(load_tensors(path / "model.pt"))
        self._load_optimizer_state(load_tensors(path / "optimizer.pt"))
        self.scheduler.load_state_dict(json.loads(trainer_file.read_text())["scheduler"])
        rng_file = path / f"rng-rank{self.rank}.pt"
        if rng_file.exists():
            _set_rng_state(load_tensors(rng_file))
        return int(state["step"])

    # -- the loop -----------------------------------------------------------------------------

    def _claim_output(self) -> tuple[int, Path] | None:
        """(rank 0) Lock OUT for the whole run, then decide fresh start or resume."""
        if self.out.exists() and not self.out.is_dir():
            raise DeltakdError(f"--out {self.out} exists and is not a directory")
        self.lock = outputs.directory_lock(self.out, f"training output {self.out}").acquire()
        return self.check_output()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def run(self) -> dict[str, Any]:
        resume_from = distributed.on_main_first(self._claim_output)
        self.build()
        start_step = 0
        if resume_from is not None:
            start_step = self.load_checkpoint(resume_from[1])
            info(f"resuming from {resume_from[1]} (step {start_step} of {self.total_steps})")
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(self.out / "metrics.jsonl", start_step)
        distributed.barrier()
        metrics = self._loop(start_step)
        return self.export(metrics)

    def _loop(self, start_step: int) -> dict[str, Any]:
        options = self.options
        dataset = batching.MicroBatchDataset(
            self.data.store,
            self.plan,
            self.rank,
            start_step,
            self.total_steps,
            self.tokenizer.pad_token_id,
            with_student=self.data.use_cached_student,
        )
        loader = batching.micro_batch_loader(
            dataset, options.num_workers, pin_memory=self.device.type == "cuda"
        )
        batches = iter(loader)
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        max_norm = options.max_grad_norm or float("inf")
        history: list[dict[str, Any]] = []
        tokens_done = 0
        started = time.perf_counter()
        metrics_file = open(self.out / "metrics.jsonl", "a") if self.rank == 0 else None
        columns = TextColumn("{task.fields[status]}")
        try:
            with progress(columns) as bar:
                task = bar.add_task(
                    options.command, total=self.total_steps, completed=start_step, status=""
                )
                for step in range(start_step, self.total_steps):
                    step_started = time.perf_counter()
                    micro = [next(batches) for _ in range(self.plan.grad_accum)]
                    global_targets = self.plan.step_targets(step)
                    totals = accumulate_gradients(
                        self.wrapped, micro, global_targets, self.world_size, self.device
                    )
                    totals = distributed.all_reduce_sum(totals) / global_targets
                    loss, sft, distill = (float(v) for v in totals.tolist())
                    grad_norm = _grad_norm(trainable, max_norm)
                    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                        self._stop_on_non_finite(step + 1, loss, grad_norm)
                    lr = self.scheduler.get_last_lr()[0]
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    seconds = time.perf_counter() - step_started
                    tokens_done += global_targets
                    epoch, _ = self.plan.locate(step)
                    record = {
                        "step": step + 1,
                        "epoch": epoch,
                        "loss": loss,
                        "sft": sft,
                        "distill": distill,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "target_tokens": global_targets,
                        "tokens_per_s": global_targets / max(seconds, 1e-9),
                        "elapsed_s": time.perf_counter() - started,
                    }
                    history.append(record)
                    history = history[-50:]
                    if metrics_file is not None and (
                        (step + 1) % options.log_every == 0 or step + 1 == self.total_steps
                    ):
                        with outputs.writing(self.out / "metrics.jsonl"):
                            faults.point("metrics")
                            metrics_file.write(json.dumps(record) + "\n")
                            metrics_file.flush()
                    bar.update(task, completed=step + 1, status=_status(record, options.objective))
                    if (
                        options.save_every
                        and (step + 1) % options.save_every == 0
                        and step + 1 < self.total_steps
                    ):
                        self.save_checkpoint(step + 1)
        finally:
            if metrics_file is not None:
                metrics_file.close()
        elapsed = time.perf_counter() - started
        last = history[-10:]
        return {
            "steps": self.total_steps,
            "resumed_at_step": start_step,
            "final_loss": history[-1]["loss"] if history else None,
            "final_sft": history[-1]["sft"] if history else None,
            "final_distill": history[-1]["distill"] if history else None,
            "mean_loss_last_10": sum(r["loss"] for r in last) / len(last) if last else None,
            "target_tokens": tokens_done,
            "seconds": elapsed,
            "tokens_per_s": tokens_done / elapsed if elapsed > 0 else None,
        }

    def _stop_on_non_finite(self, step: int, loss: float, grad_norm: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        found = complete_checkpoints(self.out)
        kept = (
            f"the last good checkpoint is {found[-1][1]}"
            if found
            else "no checkpoint was written before it"
        )
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        raise DeltakdError(f"non-finite {what} at step {step}: training stopped; {kept}")

    # -- output -------------------------------------------------------------------------------

    def export(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """OUT/ as a Hugging Face model dir plus run.json. Files are written to a staging dir
        and moved in, config.json last and run.json after it, so a partial OUT does not load."""
        model_state = self._model_state()
        summary = {
            "tool": "deltakd",
            "version": __version__,
            "command": self.options.command,
            "options": dataclasses.asdict(self.options),
            "resolved": {
                "world_size": self.world_size,
                "device": str(self.device),
                "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
                "export_dtype": str(self.export_dtype).replace("torch.", ""),
                "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps,
                "vocab_size": self.vocab_size,
                "use_cached_student": self.data.use_cached_student,
                "frozen_student": self.data.needs_frozen_student,
            },
            "provenance": self.data.provenance,
            "student": None,
            "final_metrics": metrics,
        }
        if self.rank == 0:
            summary["student"] = models.model_identity(self.options.student, self.tokenizer)
            staging = self.out / ".export.partial"
            export_state = {k: v.to(self.export_dtype) for k, v in model_state.items()}
            with outputs.writing(staging, _state_bytes(export_state)):
                if staging.exists():
                    shutil.rmtree(staging)
                self.student.config.use_cache = True
                faults.point("export save")
                self.student.save_pretrained(staging, state_dict=export_state)
                self.tokenizer.save_pretrained(staging)
                generation_config = getattr(self.student, "generation_config", None)
                if generation_config is not None:
                    generation_config.save_pretrained(staging)
                names = sorted(p.name for p in staging.iterdir())
                names = [n for n in names if n not in EXPORT_FILE_ORDER_LAST] + [
                    n for n in EXPORT_FILE_ORDER_LAST if n in names
                ]
                # Recorded before they arrive: --overwrite may then remove any of them.
                outputs.add_marker_files(self.out, names)
                for name in names:
                    faults.point(f"export {name}")
                    os.replace(staging / name, self.out / name)
                staging.rmdir()
            outputs.atomic_write_text(
                self.out / "run.json", json.dumps(summary, indent=2, default=str)
            )
        distributed.barrier()
        return summary


def _grad_norm(parameters: list[torch.Tensor], max_norm: float) -> float:
    """Clip the gradients to `max_norm` (inf: no clipping) and return their norm before."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def _truncate_metrics(path: Path, keep_through_step: int) -> None:
    """On resume, drop metric lines the interrupted run wrote after its last checkpoint."""
    if not path.exists():
        return
    if keep_through_step == 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= keep_through_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut by the kill
    path.write_text("".join(line + "\n" for line in kept))


def _status(record: dict[str, Any], objective: str) -> str:
    parts = [f"loss {record['loss']:.4f}"]
    if objective != "sft":
        parts += [f"sft {record['sft']:.4f}", f"distill {record['distill']:.4f}"]
    parts += [f"lr {record['lr']:.2e}", f"{record['tokens_per_s']:,.0f} tok/s"]
    return " · ".join(parts)


def print_summary(summary: dict[str, Any], out: str) -> None:
    """The closing lines (rank 0)."""
    if not distributed.is_main_process():
        return
    metrics = summary["final_metrics"]
    loss = metrics.get("final_loss")
    console.print(
        f"[green]done[/green]: {metrics['steps']} steps, "
        f"{metrics['target_tokens']:,} target tokens in {metrics['seconds']:.1f}s "
        f"({(metrics['tokens_per_s'] or 0):,.0f} tok/s)"
        + (f", final loss {loss:.4f}" if loss is not None else "")
    )
    console.print(f"model: {out}  (run.json, metrics.jsonl)")


def _run(options: TrainOptions, prepare: Callable[[Any], TrainingData]) -> dict[str, Any]:
    validate(options)
    device = distributed.device_for(options.device)
    models.check_device(device)
    distributed.init(device)
    if options.fsdp and not distributed.is_distributed():
        raise DeltakdError(
            "--fsdp shards the student over processes: launch with torchrun "
            "(torchrun --nproc_per_node N -m deltakd_cli ...)"
        )
    trainer = None
    try:
        tokenizer = models.load_tokenizer(options.student)
        training_data = prepare(tokenizer)
        options.source = training_data.source
        trainer = Trainer(options, training_data, tokenizer)
        summary = trainer.run()
        print_summary(summary, options.out)
        return summary
    except KeyboardInterrupt:
        raise Interrupted(_resume_hint(options)) from None
    finally:
        if trainer is not None:
            trainer.release()
        distributed.shutdown()


def _resume_hint(options: TrainOptions) -> str:
    """What to type after Ctrl-C: --resume when a checkpoint exists, else the same command."""
    found = complete_checkpoints(Path(options.out))
    if found:
        step, path = found[-1]
        how = "the same command" if options.resume else "the same command with --resume"
        return f"{options.command} stopped; rerun {how} to continue from {path} (step {step})"
    return (
        f"{options.command} stopped before its first checkpoint (--save-every "
        f"{options.save_every}); rerun the same command to start again"
    )


def distill(options: TrainOptions, cache: str) -> dict[str, Any]:
    """`deltakd distill`: train the student on a teachers' cache."""
    options.command = "distill"
    outputs.check_not_input(options.out, {"--cache": cache, "--student": options.student})
    return _run(options, lambda tokenizer: distill_data(cache, options.student, tokenizer, options))


def finetune(
    options: TrainOptions, data_path: str, template: str, max_length: int | None = None
) -> dict:
    """`deltakd finetune`: supervised finetuning on a JSONL file (objective sft)."""
    options.command = "finetune"
    options.objective = "sft"
    outputs.check_not_input(options.out, {"--model": options.student, "--data": data_path})
    max_length = models.resolve_max_length(max_length, {"--model": options.student})
    return _run(
        options, lambda tokenizer: finetune_data(data_path, template, max_length, tokenizer)
    )
