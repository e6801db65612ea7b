"""Before any weight is loaded: what a training run needs per device (memory.py's estimate for
this run's options and longest example), and a one-line refusal, naming what would fit, when
that cannot fit."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deltakd_cli import distributed, memory, models
from deltakd_cli.train.inputs import TrainingData
from deltakd_cli.train.objective import default_chunk_size
from deltakd_cli.train.options import DEFAULT_LORA_TARGETS, TrainOptions

SUGGESTED_LORA_RANK = 16


def longest_example(training_data: TrainingData) -> int:
    """Tokens in the longest training example (what bounds a micro-batch's padded length)."""
    store = training_data.store
    lengths = [store.shard_lengths(s) for s in range(store.num_shards)]
    return max((int(np.max(shard)) for shard in lengths if len(shard)), default=0)


def training_estimate_for(
    options: TrainOptions,
    shape: memory.ModelShape,
    length: int,
    device: torch.device,
    **changes: Any,
) -> memory.Estimate:
    """The per-device estimate of this run (examples of up to `length` tokens), or of it with
    some options changed (`changes`: batch_size, lora_r, gradient_checkpointing, shards)."""
    batch_size = changes.get("batch_size", options.batch_size)
    # every example padded to the longest allowed: the worst micro-batch the plan may make
    budgets = (options.max_tokens_per_batch, batch_size * length if batch_size else None)
    tokens = min(budget for budget in budgets if budget)
    rank = changes.get("lora_r", options.lora_r)
    targets = options.lora_targets if options.lora_r else DEFAULT_LORA_TARGETS.split(",")
    compute = models.resolve_dtype(options.dtype, device)
    return memory.training_estimate(
        shape,
        micro_batch_tokens=tokens,
        logit_chunk_positions=options.logit_chunk_size or default_chunk_size(shape.vocab_size),
        compute_bytes=torch.finfo(compute).bits // 8,
        lora_trainable=memory.lora_parameters(shape, rank, targets) if rank else 0,
        four_bit=options.lora_4bit,
        frozen_copy=options.frozen_student and not rank,
        checkpointed=changes.get("gradient_checkpointing", options.gradient_checkpointing),
        shards=changes.get("shards", distributed.world_size() if options.fsdp else 1),
    )


def check_memory(options: TrainOptions, device: torch.device, length: int) -> None:
    """Before any weight is loaded: print what the run needs per device (every micro-batch
    padded to the longest example, `length` tokens) and refuse, in one line, when that cannot
    fit, naming what would."""
    shape = memory.shape_of_model(options.student, options.load_settings())

    def changed(**changes: Any) -> memory.Estimate:
        return training_estimate_for(options, shape, length, device, **changes)

    estimate = changed()
    alternatives: list[list[memory.Alternative]] = []
    if not options.lora_r:
        rank = SUGGESTED_LORA_RANK
        alternatives.append([(f"--lora-r {rank}", changed(lora_r=rank))])
    if not options.gradient_checkpointing:
        alternatives.append([("--gradient-checkpointing", changed(gradient_checkpointing=True))])
    if device.type == "cuda" and not options.lora_r and not options.fsdp:
        gpus = (2, 4, 8, 16, 32, 64)
        alternatives.append([(f"--fsdp over {n} GPUs", changed(shards=n)) for n in gpus])
    if options.batch_size and options.batch_size > 1:
        smaller = range(options.batch_size - 1, 0, -1)
        alternatives.append([(f"--batch-size {b}", changed(batch_size=b)) for b in smaller])
    on_device = distributed.local_world_size() if device.type == "cpu" else 1
    memory.check_fits(options.command, estimate, device, alternatives, on_device)
