"""The module DDP and FSDP2 wrap: the student plus its loss. The student's decoder runs once; its
hidden states at the N target positions are gathered and pushed through the output layer
(`models.head_logits`, the same step the cache uses) in chunks of positions, each chunk under
activation checkpointing, so only one chunk's [n, V] logits exist at a time (forward and
backward)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deltakd_cli import losses, models
from deltakd_cli.train.options import TrainOptions, objective_settings

LOGIT_ELEMENTS_PER_CHUNK = 1 << 25  # ~128 MiB of float32 logits per chunk by default


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
        cache_alpha: float | None = None,
        frozen_is_adapter_disabled: bool = False,
        cache_grid: tuple[tuple[float, float], ...] = (),
        cache_temperature: float = 1.0,
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
        self.loss_options = {
            "settings": objective_settings(options),
            "temperature": options.temperature,
            "sft_weight": options.sft_weight,
            "cache_alpha": cache_alpha,
            "cache_grid": tuple(cache_grid),
            "cache_temperature": cache_temperature,
        }

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
