"""LoRA students through peft: the student's weights stay frozen and low-rank adapters
(W + alpha/r * B A) are trained on the chosen linear layers of its decoder layers.

The model the trainer holds is then a peft `PeftModel`; `models.decoder_of`,
`models.decoder_layers` and `models.head_logits` reach the Hugging Face model through it (peft
forwards attribute access). The frozen S0 of the live-S0 objectives is the same model with its
adapters switched off (`disable_adapter()`), not a copy. Checkpoints hold the PeftModel's whole
state dict; the export merges the adapters into the weights (`merged_state`) so OUT is a plain
Hugging Face model, and `--save-adapter` adds OUT/adapter, the adapter alone as peft writes it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltakd_cli import models
from deltakd_cli.errors import DeltakdError
from deltakd_cli.train.hub import ADAPTER_DIR  # noqa: F401  (OUT/adapter with --save-adapter)
from deltakd_cli.train.options import TrainOptions

ADAPTER_NAME = "default"  # peft's name of the one adapter
PEFT_PREFIX = "base_model.model."  # PeftModel state-dict keys = this + the HF model's keys
FOUR_BIT_NEEDS = "--lora-4bit needs a CUDA device and bitsandbytes: pip install bitsandbytes"


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    four_bit: bool

    @property
    def scaling(self) -> float:
        """What the adapter's product B A is multiplied by (peft's plain, non-rsLoRA rule)."""
        return self.alpha / self.r

    def describe(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "four_bit": self.four_bit,
        }


def settings_of(options: TrainOptions) -> LoraSettings | None:
    """The run's LoRA settings, or None when every weight trains."""
    if not options.lora_r:
        return None
    return LoraSettings(
        r=options.lora_r,
        alpha=options.resolved_lora_alpha,
        dropout=options.lora_dropout,
        target_modules=tuple(options.lora_targets),
        four_bit=options.lora_4bit,
    )


def check_four_bit(device: torch.device) -> None:
    """QLoRA holds the frozen weights in bitsandbytes' 4-bit format, which runs on CUDA only."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DeltakdError(FOUR_BIT_NEEDS) from None
    if device.type != "cuda":
        raise DeltakdError(FOUR_BIT_NEEDS)


def four_bit_config(compute_dtype: torch.dtype) -> Any:
    """NF4 weights with double quantization, computed in the run's dtype (QLoRA's recipe)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def linear_names_in_layers(model: nn.Module) -> list[str]:
    """The names (last part) of the linear layers inside the decoder layers: what can be a
    target. The output layer and the embeddings are outside the decoder layers."""
    _, layers = models.decoder_layers(model)
    names = set()
    for layer in layers:
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) or type(module).__name__.startswith("Linear"):
                names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_targets(model: nn.Module, targets: Iterable[str]) -> None:
    existing = linear_names_in_layers(model)
    missing = [name for name in targets if name not in existing]
    if missing:
        raise DeltakdError(
            f"--lora-target-modules: {', '.join(missing)} matches no linear layer of the "
            f"student's decoder layers (they have: {', '.join(existing)})"
        )


def add_adapters(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """The student as a PeftModel: its own weights frozen, fresh adapters (B = 0, so it starts
    as S0) trainable."""
    from peft import LoraConfig, get_peft_model

    check_targets(model, settings.target_modules)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_adapted(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PeftModel (adapters injected), or the model itself."""
    return model.get_base_model() if is_adapted(model) else model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    return {
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def plain_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PeftModel's state dict without its adapters, under the plain model's key names."""
    plain = {}
    for key, value in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        if ".lora_" not in name:
            plain[name.replace(".base_layer.", ".")] = value
    return plain


def adapter_deltas(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight update, scaling * B A, under the layer's weight name."""
    deltas = {}
    suffix = f".lora_A.{ADAPTER_NAME}.weight"
    for key, down in state.items():
        if key.endswith(suffix):
            layer = key.removeprefix(PEFT_PREFIX).removesuffix(suffix)
            up = state[f"{PEFT_PREFIX}{layer}.lora_B.{ADAPTER_NAME}.weight"]
            deltas[f"{layer}.weight"] = scaling * (up.float() @ down.float())
    return deltas


def merged_state(
    state: dict[str, torch.Tensor],
    scaling: float,
    base: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter merged into its layer: W + scaling * B A
    (what peft's merge_and_unload computes), done on the state so the training model and its
    memory are left alone. `base`: the plain weights to merge into when the state's own are not
    plain tensors (QLoRA's 4-bit ones); LoRA changes no other weight."""
    plain = base if base is not None else plain_state(state)
    deltas = adapter_deltas(state, scaling)
    return {
        name: (value.float() + deltas[name]).to(value.dtype) if name in deltas else value
        for name, value in plain.items()
    }


def save_adapter(directory: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The adapter alone as peft writes it (adapter_config.json, adapter_model.safetensors),
    from `state` (the exported weights, which may be an earlier step's than the model's)."""
    model.save_pretrained(str(directory), state_dict=state)
