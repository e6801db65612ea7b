"""Which layers of the source to keep: evenly spaced, given explicitly, or by block influence
(ShortGPT) measured on the healing text."""

from __future__ import annotations

import torch
from torch import nn

from deltakd_cli import models
from deltakd_cli.errors import DeltakdError
from deltakd_cli.init_student.options import LAYER_RULES


def resolve_rule(rule: str, have_text: bool) -> str:
    """auto: block-influence when there is text to measure it on, else uniform."""
    if rule not in LAYER_RULES:
        raise DeltakdError(f"unknown layer rule '{rule}' (choose from {', '.join(LAYER_RULES)})")
    if rule == "auto":
        return "block-influence" if have_text else "uniform"
    if rule == "block-influence" and not have_text:
        raise DeltakdError("--layer-rule block-influence needs text to measure it on (--heal-data)")
    return rule


def choose_layers(
    num_layers: int, keep: int, rule: str = "uniform", scores: list[float] | None = None
) -> list[int]:
    """Indices of the source layers to keep, ascending.

    uniform: evenly spaced from the first layer to the last, both included.
    block-influence: the `keep` layers that change their input most (ShortGPT, Men et al. 2024:
    a layer whose output is nearly its input can go); `scores` from block_influence()."""
    if not 1 <= keep <= num_layers:
        raise DeltakdError(f"--layers must be between 1 and {num_layers}, got {keep}")
    if rule == "block-influence":
        if scores is None or len(scores) != num_layers:
            raise DeltakdError("block-influence needs one score per source layer")
        ranked = sorted(range(num_layers), key=lambda index: (-scores[index], index))
        return sorted(ranked[:keep])
    if rule != "uniform":
        raise DeltakdError(f"unknown layer rule '{rule}' (choose from {', '.join(LAYER_RULES)})")
    if keep == 1:
        return [num_layers - 1]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def influence_from_hidden(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Block influence of one layer on one sequence: 1 - mean over tokens of
    cos(hidden state in, hidden state out); [T, H], [T, H] -> scalar."""
    cosine = torch.nn.functional.cosine_similarity(inputs.float(), outputs.float(), dim=-1)
    return 1.0 - cosine.mean()


@torch.inference_mode()
def block_influence(model: nn.Module, sequences: list[list[int]]) -> list[float]:
    """Per decoder layer, its block influence averaged over `sequences` (one at a time, so no
    padding enters the average). Hooks read each layer's input and output hidden states."""
    _, layers = models.decoder_layers(model)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index: int):
        def record(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            captured[index] = (hidden_in[0], hidden_out[0])

        return record

    handles = [
        layer.register_forward_hook(hook(index), with_kwargs=True)
        for index, layer in enumerate(layers)
    ]
    totals = torch.zeros(len(layers), dtype=torch.float64)
    device = next(model.parameters()).device
    try:
        for ids in sequences:
            model(input_ids=torch.tensor([ids], device=device))
            for index, (hidden_in, hidden_out) in captured.items():
                totals[index] += float(influence_from_hidden(hidden_in, hidden_out))
            captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    return (totals / max(len(sequences), 1)).tolist()


def parse_layers(text: str, num_layers: int) -> list[int]:
    """'0,3,6-9,29' -> [0, 3, 6, 7, 8, 9, 29]: distinct, ascending, within the source."""
    chosen: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                chosen.extend(range(low, high + 1))
            else:
                chosen.append(int(part))
        except ValueError:
            raise DeltakdError(
                f"--keep-layers: '{part}' is not a layer number or range (like 0,3,6-9)"
            ) from None
    if not chosen:
        raise DeltakdError("--keep-layers is empty")
    if len(set(chosen)) != len(chosen):
        raise DeltakdError(f"--keep-layers names a layer twice: {text}")
    outside = [i for i in chosen if not 0 <= i < num_layers]
    if outside:
        raise DeltakdError(f"--keep-layers: layer {outside[0]} is outside 0..{num_layers - 1}")
    return sorted(chosen)
