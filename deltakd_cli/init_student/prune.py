"""The pruned copy: the kept decoder layers with the embeddings, final norm and output layer,
as a Hugging Face directory of fewer layers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from deltakd_cli import models
from deltakd_cli.errors import DeltakdError


def pruned_config(config: Any, keep: list[int]) -> Any:
    """The source config with `keep` layers; per-layer lists (e.g. layer_types) follow."""
    config = config.__class__.from_dict(config.to_dict())
    count = int(config.num_hidden_layers)
    for name, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == count and name != "architectures":
            setattr(config, name, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
    return config


def pruned_state_dict(
    state: dict[str, torch.Tensor], prefix: str, keep: list[int]
) -> dict[str, torch.Tensor]:
    """Layer `keep[j]` of the source becomes layer j; everything outside the layers is kept."""
    new_index = {old: new for new, old in enumerate(keep)}
    result = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            result[key] = value
            continue
        index, rest = key[len(prefix) :].split(".", 1)
        if int(index) in new_index:
            result[f"{prefix}{new_index[int(index)]}.{rest}"] = value
    return result


def prune(
    source: str, keep: list[int], out_dir: Path, load: models.LoadSettings = models.DEFAULT_LOAD
) -> Path:
    """Write a Hugging Face directory holding the source with only the `keep` layers."""
    from transformers import AutoModelForCausalLM

    dtype = models.stored_dtype(source, load)
    tokenizer = models.load_tokenizer(source, load)
    model = models.load_model(source, dtype, torch.device("cpu"), settings=load)
    models.check_model_vocab(model, len(tokenizer), f"model {source} (its tokenizer's ids)")
    prefix, _ = models.decoder_layers(model)
    config = pruned_config(model.config, keep)
    state = pruned_state_dict(model.state_dict(), prefix, keep)
    pruned = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        pruned.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise DeltakdError(
            f"cannot prune {type(model).__name__}: the copy's weights do not line up "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    pruned.generation_config = model.generation_config
    pruned.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    return out_dir


def source_layers(spec: str, load: models.LoadSettings) -> int:
    from transformers import AutoConfig

    source = models.resolve_source(spec)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    kwargs.update(load.hub_kwargs(source))
    try:
        model_config = AutoConfig.from_pretrained(source.path, **kwargs)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DeltakdError(f"cannot read the model config of '{spec}': {first}") from None
    count = getattr(model_config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise DeltakdError(f"'{spec}': its model config gives no number of layers")
    return count
