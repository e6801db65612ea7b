"""The module DDP and FSDP2 wrap: the student plus its loss. The student's decoder runs once; its
hidden states at the N target positions are gathered and pushed through the output layer
(`models.head_logits`, the same step the cache uses) in chunks of positions, each chunk under
activation checkpointing, so only one chunk's [n, V] logits exist at a time (forward and
backward). Per chunk, `chunk_loss` builds the objective's target view (method/view.py) and takes
its divergence (method/divergences.py), mixed with the SFT cross-entropy."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deltakd_cli import models
from deltakd_cli.errors import DeltakdError
from deltakd_cli.method import objectives
from deltakd_cli.method.divergences import sft_loss
from deltakd_cli.method.objectives import Objective
from deltakd_cli.method.spec import CacheFacts, Tail, tail_estimator
from deltakd_cli.method.targets import CachedTargets
from deltakd_cli.method.view import build_view, student_view
from deltakd_cli.options import check
from deltakd_cli.train.options import TrainOptions, objective_settings

LOGIT_ELEMENTS_PER_CHUNK = 1 << 25  # ~128 MiB of float32 logits per chunk by default


def chunk_loss(
    objective: str | Objective,
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    cached: CachedTargets | None,
    *,
    settings: Any = None,
    tail: Tail | None = None,
    temperature: float = 1.0,
    sft_weight: float = 0.0,
    facts: CacheFacts = CacheFacts(),
    frozen_student_logits: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The training loss of one chunk of positions, as per-position tensors [N]:

    "sft" (cross-entropy), "distill" (the objective's divergence over its target view, zeros for
    "sft") and "loss" = sft_weight * sft + (1 - sft_weight) * distill * temperature**2 (the tau^2
    keeps gradient scales comparable across temperatures); for objective "sft", loss = sft.
    `settings`: the objective's own (None: their defaults); `tail`: the tail estimator (None:
    the bucket)."""
    entry = objective if isinstance(objective, Objective) else objectives.get(objective)
    if not temperature > 0:
        raise DeltakdError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= sft_weight <= 1.0:
        raise DeltakdError(f"sft weight must be between 0 and 1, got {sft_weight}")
    logits = student_logits.float()
    sft = sft_loss(logits, labels)
    divergence = entry.divergence_function()
    if divergence is None:
        return {"loss": sft, "sft": sft, "distill": torch.zeros_like(sft)}
    if cached is None:
        raise DeltakdError(f"objective {entry.name!r} needs cached teacher targets")
    if not entry.takes_temperature and temperature != 1.0:
        raise DeltakdError(
            f"objective {entry.name!r} matches log-prob shifts and takes no temperature; "
            "use temperature 1"
        )
    check_shapes(logits, cached, frozen_student_logits)
    settings = settings or entry.settings()
    check(settings)  # a library caller's settings get the flags' bounds (mix, gamma in [0, 1])
    view = build_view(
        cached,
        entry.target(settings),
        tail or tail_estimator("bucket"),
        facts,
        temperature,
        frozen_student_logits,
    )
    distill = divergence(view, student_view(logits, view, temperature), settings)
    loss = sft_weight * sft + (1.0 - sft_weight) * distill * temperature**2
    return {"loss": loss, "sft": sft, "distill": distill}


def check_shapes(
    student_logits: torch.Tensor,
    cached: CachedTargets,
    frozen_student_logits: torch.Tensor | None = None,
) -> None:
    """One line when the chunk's tensors do not line up (one row per target position)."""
    if student_logits.dim() != 2:
        raise DeltakdError(
            f"student logits must be [positions, vocab], got {tuple(student_logits.shape)}"
        )
    if cached.ids.dim() != 2 or cached.ids.shape[0] != student_logits.shape[0]:
        raise DeltakdError(
            f"cached ids {tuple(cached.ids.shape)} do not match student logits "
            f"{tuple(student_logits.shape)} (one row per target position)"
        )
    if cached.ids.shape[1] > student_logits.shape[1]:
        raise DeltakdError(
            f"the cache keeps {cached.ids.shape[1]} ids per position but the student's "
            f"vocabulary has only {student_logits.shape[1]}"
        )
    if frozen_student_logits is not None and frozen_student_logits.shape != student_logits.shape:
        raise DeltakdError(
            f"frozen student logits {tuple(frozen_student_logits.shape)} do not match the "
            f"student's {tuple(student_logits.shape)}"
        )


def target_hidden(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Hidden states [N, H] at the batch's target positions."""
    outputs = models.decoder_of(model)(
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
    student's parameters. A frozen S0, when needed, is a submodule whose parameters need no grad,
    or, for a LoRA student (`frozen_is_adapter_disabled`), the student itself with its adapters
    switched off: its frozen weights are S0, so no copy is held."""

    def __init__(
        self,
        student: nn.Module,
        options: TrainOptions,
        vocab_size: int,
        compute_dtype: torch.dtype,
        frozen_student: nn.Module | None = None,
        facts: CacheFacts = CacheFacts(),
        frozen_is_adapter_disabled: bool = False,
        tail: Tail | None = None,
    ):
        super().__init__()
        if frozen_is_adapter_disabled and frozen_student is not None:
            raise ValueError("the frozen S0 is either a model or the adapter-disabled student")
        self.student = student
        self.frozen_student = frozen_student
        self.frozen_is_adapter_disabled = frozen_is_adapter_disabled
        self.objective = options.objective
        self.vocab_size = vocab_size
        self.chunk_size = options.logit_chunk_size or default_chunk_size(vocab_size)
        self.compute_dtype = compute_dtype
        self.settings = objective_settings(options)
        self.tail = tail
        self.temperature = options.temperature
        self.sft_weight = options.sft_weight
        self.facts = facts

    @property
    def has_frozen_student(self) -> bool:
        return self.frozen_student is not None or self.frozen_is_adapter_disabled

    def _frozen(self) -> tuple[nn.Module, Any]:
        """The frozen S0 and the context to run it in (no grad; adapters off for LoRA)."""
        if self.frozen_is_adapter_disabled:
            return self.student, self.student.disable_adapter()
        return self.frozen_student, nullcontext()

    def _chunk_sums(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        cached: Any,
        frozen_hidden: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = models.head_logits(self.student, hidden, self.vocab_size)
        frozen_logits = None
        if frozen_hidden is not None:
            frozen, switched = self._frozen()
            with torch.no_grad(), switched:
                frozen_logits = models.head_logits(frozen, frozen_hidden, self.vocab_size)
        parts = chunk_loss(
            self.objective,
            logits,
            labels,
            cached,
            settings=self.settings,
            tail=self.tail,
            temperature=self.temperature,
            sft_weight=self.sft_weight,
            facts=self.facts,
            frozen_student_logits=frozen_logits,
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
            if self.has_frozen_student:
                frozen, switched = self._frozen()
                with torch.no_grad(), switched:
                    frozen_hidden = target_hidden(frozen, batch)
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
