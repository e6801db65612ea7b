"""One optimizer step: micro-batches forward and backward with the exact global token count,
the AdamW optimizer, the warmup-cosine schedule and gradient clipping.

Loss normalisation: an optimizer step sums the per-position losses of all its micro-batches on all
ranks and divides by the number of target tokens of the whole step (known in advance from the
batch plan). Each rank backpropagates `sum of its losses * world_size / global targets`; DDP (and
FSDP2) average gradients over ranks, which cancels the world_size factor, so the update is the
same however the step is split into micro-batches or ranks."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from deltakd_cli.train.options import TrainOptions


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


def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float) -> float:
    """Clip the gradients to `max_norm` (inf: no clipping) and return their norm before."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)
