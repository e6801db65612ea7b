"""How much memory a run needs per device, estimated from model configurations before any weight
is loaded, and the one-line refusal when it cannot fit.

The arithmetic is pure (shapes and byte counts in, bytes out). What it counts:

- weights: every parameter in the dtype it is held in (training holds float32 master weights);
- gradients and AdamW state: 4 + 8 bytes per *trainable* parameter (float32 gradient, exp_avg,
  exp_avg_sq), so full training is 16 bytes per parameter and LoRA pays it on the adapters only;
- activations: what backward keeps of one micro-batch, per token and decoder layer, in the compute
  dtype (one layer's worth plus each layer's input under activation checkpointing);
- the logits chunk: the [positions, vocabulary] float32 block the output head works on (training
  and the cache both chunk it), times the copies the loss or the target builder holds at once.

It errs on the large side (every sequence padded to the longest allowed) but counts nothing
twice; `make bench` (bench/memory_bench.py) compares it with measured peaks."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
FLOAT32 = 4
ADAMW_BYTES_PER_TRAINABLE = 4 + 8  # the float32 gradient, exp_avg and exp_avg_sq
FOUR_BIT_BYTES = 0.5  # QLoRA's NF4 weights (scales left out: a few percent)
# Values backward keeps per token and decoder layer of a Llama-style layer, in units of the
# hidden size H, the key/value width KV and the MLP width I: the layer's input, two norm outputs,
# q, the attention output and the o_proj output (6 H), k and v (2 KV), gate, up, the activation
# and its product (4 I).
ACTIVATION_HIDDEN, ACTIVATION_KV, ACTIVATION_MLP = 6, 2, 4
# [positions, vocab] float32 blocks alive at once while a training chunk's loss runs (logits,
# log-softmax, the target distribution, the gradient of the logits, the softmax of backward):
# bench/memory_bench.py measured 663 MiB over the head-skipped step for 134 MiB chunks, ~5.
TRAINING_LOGIT_COPIES = 5
# In cache-teachers: each model's log-probs of a chunk, plus the target builder's work
# (exp, the delta target, the selection's scores).
CACHE_EXTRA_LOGIT_COPIES = 3
LIMIT_VARIABLE = "DELTAKD_MEMORY_LIMIT_GB"


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model configuration."""

    parameters: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_width(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class Estimate:
    """Bytes per device, by part (insertion order is the order they are shown in)."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def parts_text(self) -> str:
        return ", ".join(f"{name} {size_text(size)}" for name, size in self.parts.items())

    def describe(self) -> str:
        return f"{size_text(self.total)} ({self.parts_text()})"


def size_text(size: float) -> str:
    """Bytes for a person: MiB under a GiB, else GiB."""
    if size < GIB:
        return f"{size / 2**20:.0f} MiB"
    return f"{size / GIB:.2f} GiB" if size < 10 * GIB else f"{size / GIB:.1f} GiB"


# ----------------------------------------------------------------------------- configurations


def shape_of_config(config: Any, parameters: int | None = None) -> ModelShape:
    """A ModelShape from a Hugging Face config (Llama, Qwen2, Mistral, ... field names);
    `parameters` when counted elsewhere (e.g. on the meta device), else the Llama formula."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    shape = ModelShape(
        parameters=0,
        hidden_size=hidden,
        intermediate_size=int(getattr(config, "intermediate_size", None) or 4 * hidden),
        num_layers=int(config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab_size=int(config.vocab_size),
    )
    if parameters is None:
        tied = bool(getattr(config, "tie_word_embeddings", False))
        qkv_bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        parameters = llama_parameters(shape, tied=tied, qkv_bias=qkv_bias)
    return ModelShape(**{**shape.__dict__, "parameters": parameters})


def llama_parameters(shape: ModelShape, tied: bool, qkv_bias: bool = False) -> int:
    """Parameters of a Llama-style decoder (RMSNorms, gated MLP; Qwen2 adds q/k/v biases)."""
    hidden, kv, width = shape.hidden_size, shape.kv_width, shape.attention_width
    attention = hidden * width + 2 * hidden * kv + width * hidden
    if qkv_bias:
        attention += width + 2 * kv
    mlp = 3 * hidden * shape.intermediate_size
    layer = attention + mlp + 2 * hidden  # two RMSNorm weights
    embeddings = shape.vocab_size * hidden
    head = 0 if tied else shape.vocab_size * hidden
    return embeddings + shape.num_layers * layer + hidden + head  # + the final norm


LINEAR_SHAPES = {  # (inputs, outputs) of the linear layers LoRA may target, by their name
    "q_proj": lambda s: (s.hidden_size, s.attention_width),
    "k_proj": lambda s: (s.hidden_size, s.kv_width),
    "v_proj": lambda s: (s.hidden_size, s.kv_width),
    "o_proj": lambda s: (s.attention_width, s.hidden_size),
    "gate_proj": lambda s: (s.hidden_size, s.intermediate_size),
    "up_proj": lambda s: (s.hidden_size, s.intermediate_size),
    "down_proj": lambda s: (s.intermediate_size, s.hidden_size),
}


def lora_parameters(shape: ModelShape, rank: int, targets: list[str]) -> int:
    """Trainable parameters of rank-r adapters (A: r x in, B: out x r) on every decoder layer's
    target layers; a name this table does not know counts as a hidden x hidden layer."""
    per_layer = 0
    for name in targets:
        inputs, outputs = LINEAR_SHAPES.get(name, lambda s: (s.hidden_size, s.hidden_size))(shape)
        per_layer += rank * (inputs + outputs)
    return shape.num_layers * per_layer


# ----------------------------------------------------------------------------- the estimates


def activation_bytes(shape: ModelShape, tokens: int, compute_bytes: int, checkpointed: bool) -> int:
    """What backward keeps of a micro-batch of `tokens` (padded) tokens: every layer's saved
    values, or with activation checkpointing each layer's input plus one layer recomputed."""
    per_layer = (
        ACTIVATION_HIDDEN * shape.hidden_size
        + ACTIVATION_KV * shape.kv_width
        + ACTIVATION_MLP * shape.intermediate_size
    )
    if checkpointed:
        kept = shape.num_layers * shape.hidden_size + per_layer
    else:
        kept = shape.num_layers * per_layer
    return tokens * (kept + shape.hidden_size) * compute_bytes  # + the final hidden states


def training_estimate(
    shape: ModelShape,
    *,
    micro_batch_tokens: int,
    logit_chunk_positions: int,
    compute_bytes: int = FLOAT32,
    lora_trainable: int = 0,
    four_bit: bool = False,
    frozen_copy: bool = False,
    checkpointed: bool = False,
    shards: int = 1,
) -> Estimate:
    """distill and finetune per device. `lora_trainable` > 0: a LoRA student (frozen float32
    weights, or 4-bit ones, and AdamW on the adapters only); `frozen_copy`: a live S0 held in
    the compute dtype; `shards`: FSDP2 over that many devices (weights, gradients, optimizer)."""
    if lora_trainable:
        frozen_bytes = FOUR_BIT_BYTES if four_bit else FLOAT32
        weights = math.ceil(shape.parameters * frozen_bytes) + lora_trainable * FLOAT32
        trainable = lora_trainable
    else:
        weights = shape.parameters * FLOAT32
        trainable = shape.parameters
    if compute_bytes != FLOAT32:  # autocast keeps a low-precision copy of each weight it casts
        weights += shape.parameters * compute_bytes
    if frozen_copy:
        weights += shape.parameters * compute_bytes
    chunk = min(logit_chunk_positions, micro_batch_tokens)
    return Estimate(
        {
            "weights": math.ceil(weights / shards),
            "gradients and AdamW state": trainable * ADAMW_BYTES_PER_TRAINABLE // shards,
            "activations": activation_bytes(shape, micro_batch_tokens, compute_bytes, checkpointed),
            "logits chunk": chunk * shape.vocab_size * FLOAT32 * TRAINING_LOGIT_COPIES,
        }
    )


def inference_estimate(
    shapes: list[ModelShape],
    *,
    batch_tokens: int,
    position_chunk: int,
    weight_bytes: int,
    roles: int,
) -> Estimate:
    """cache-teachers per device: every distinct model's weights; the largest model's working
    set for one layer of the batch and every model's hidden states at the targets; the chunk of
    full-vocabulary log-probs of all `roles` at once plus the target builder's work."""
    largest = max(shapes, key=lambda shape: shape.parameters)
    one_layer = batch_tokens * (
        4 * largest.hidden_size + 2 * largest.intermediate_size
    )  # inference frees a layer's values as soon as the next layer has its input
    kept_hidden = sum(batch_tokens * shape.hidden_size for shape in shapes)
    chunk = min(position_chunk, batch_tokens)
    vocab = max(shape.vocab_size for shape in shapes)
    return Estimate(
        {
            "weights": sum(shape.parameters for shape in shapes) * weight_bytes,
            "activations": (one_layer + kept_hidden) * weight_bytes,
            "log-probs chunk": chunk * vocab * FLOAT32 * (roles + CACHE_EXTRA_LOGIT_COPIES),
        }
    )


# ----------------------------------------------------------------------------- the device


def limit_override() -> int | None:
    """DELTAKD_MEMORY_LIMIT_GB, in bytes (a forced budget: tests, shared machines)."""
    value = os.environ.get(LIMIT_VARIABLE)
    if not value:
        return None
    try:
        return int(float(value) * GIB)
    except ValueError:
        from deltakd_cli.errors import DeltakdError

        raise DeltakdError(f"{LIMIT_VARIABLE}={value!r} is not a number of GiB") from None


def cpu_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable: what the kernel can give without swapping (None where there is no
    /proc/meminfo)."""
    try:
        with open(meminfo) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def device_available_bytes(device: Any) -> tuple[int | None, str]:
    """(bytes this run may use on the device, what they are): the override, a GPU's free
    memory, or the host's available RAM."""
    forced = limit_override()
    if forced is not None:
        return forced, f"{LIMIT_VARIABLE} allows"
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{device} has free"
    return cpu_available_bytes(), "the host has available"


Alternative = tuple[str, Estimate]  # an option to give (its flag and value) and its estimate


def fitting(groups: list[list[Alternative]], available: int) -> list[str]:
    """The first alternative of each group that fits (a group is ordered from the mildest
    change: the fewest GPUs, the largest batch), each with its estimate."""
    chosen = []
    for group in groups:
        for label, estimate in group:
            if estimate.total <= available:
                chosen.append(f"{label} (about {size_text(estimate.total)})")
                break
    return chosen


def check_fits(
    command: str,
    estimate: Estimate,
    device: Any,
    alternatives: list[list[Alternative]],
    processes_on_device: int = 1,
) -> None:
    """Print the estimate (one line); refuse in one line when it exceeds what the device has,
    naming what would fit (`alternatives`: groups, see `fitting`). `processes_on_device`: ranks
    sharing it (CPU runs under torchrun)."""
    from deltakd_cli.console import info
    from deltakd_cli.errors import DeltakdError

    available, source = device_available_bytes(device)
    sharing = f" x {processes_on_device} processes" if processes_on_device > 1 else ""
    have = f"{source} {size_text(available)}" if available is not None else f"{source} unknown"
    info(f"memory: {command} needs about {estimate.describe()} per device{sharing}; {have}")
    if available is None or estimate.total * processes_on_device <= available:
        return
    options = fitting(alternatives, available // processes_on_device)
    advice = (
        "what would fit: " + ", or ".join(options)
        if options
        else "nothing this command can change would fit: use a smaller model or a larger device"
    )
    raise DeltakdError(
        f"{command} needs about {size_text(estimate.total)} on {device}{sharing} "
        f"({estimate.parts_text()}) but {have}; {advice}"
    )


# ----------------------------------------------------------------------------- models


def meta_parameters(config: Any) -> int | None:
    """Parameters of the model a config builds, counted on the meta device (no memory, exact
    for any architecture transformers knows; None when it cannot be built so)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:
        return None
    distinct = {id(parameter): parameter for parameter in model.parameters()}  # tied: once
    return sum(parameter.numel() for parameter in distinct.values())


def shape_of_model(spec: str, settings: Any) -> ModelShape:
    """A model's shape from its configuration alone (no weights read)."""
    from deltakd_cli import models

    config = models.model_config(spec, settings)
    config = getattr(config, "text_config", None) or config  # multimodal wrappers
    return shape_of_config(config, meta_parameters(config))
