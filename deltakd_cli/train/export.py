"""The end of a training run: OUT as a Hugging Face model directory, then `run.json`, the run's
record. Files are written to a staging dir and moved in, config.json last and run.json after
it, so a partial OUT neither loads nor looks finished."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deltakd_cli import faults, outputs
from deltakd_cli.train.checkpoint import state_bytes
from deltakd_cli.train.hub import ADAPTER_DIR, MODEL_FILE_PATTERNS

EXPORT_FILE_ORDER_LAST = ("config.json",)  # moved last: before it arrives, OUT does not load
# What --report-to writes into OUT (tracking.py): TensorBoard, W&B, a local MLflow store.
TRACKER_DIRS = ("runs", "wandb", "mlruns")
# What a training run writes into OUT besides the exported model files (recorded in the
# output marker as they are written): what --overwrite removes, and nothing else.
RUN_FILES = (
    "checkpoints", "metrics.jsonl", "run.json", "README.md", ".export.partial", *TRACKER_DIRS
)  # fmt: skip
CARD = "README.md"  # the model card (card.py)


def recorded_run_entries(out: Path) -> list[str] | None:
    """The entries a training run of an earlier deltakd (no output marker) created in OUT, as
    proved by its own record: run.json written by deltakd distill/finetune. None when OUT holds
    no such record; nothing is recognised by folder names alone."""
    import fnmatch

    try:
        record = json.loads((out / "run.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("tool") != "deltakd":
        return None
    if record.get("command") not in ("distill", "finetune"):
        return None
    return [
        entry.name
        for entry in out.iterdir()
        if entry.name in RUN_FILES
        or any(fnmatch.fnmatch(entry.name, pattern) for pattern in MODEL_FILE_PATTERNS)
    ]


def stop_tokens(student: Any, tokenizer: Any, template: dict[str, Any] | None) -> list[int]:
    """The ids generation stops on: the EOS the training responses ended with (the cache's
    template tokenizer's, e.g. an instruct teacher's <|im_end|>), then the student's own."""
    ids: list[int] = []
    configured = getattr(getattr(student, "generation_config", None), "eos_token_id", None)
    for candidate in (
        (template or {}).get("eos_token_id"),
        configured,
        tokenizer.eos_token_id,
    ):
        for value in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
            if value is not None and int(value) not in ids:
                ids.append(int(value))
    return ids


def export_model(
    out: Path,
    student: Any,
    tokenizer: Any,
    model_state: dict[str, torch.Tensor],
    export_dtype: torch.dtype,
    template: dict[str, Any] | None = None,
    also_write: Callable[[Path], None] | None = None,
) -> list[str]:
    """(rank 0) OUT as a Hugging Face model dir: written to a staging dir and moved in file by
    file, config.json last, so a partial OUT does not load. Returns the names it wrote.

    A student trained from a cache behaves like the teacher whose template rendered the data:
    its tokenizer gets that chat template and EOS, and generation_config.json stops on that EOS
    as well as its own. `also_write(staging)` adds files that arrive with the model (a LoRA
    student's adapter directory)."""
    from transformers import GenerationConfig

    staging = out / ".export.partial"
    export_state = {k: v.to(export_dtype) for k, v in model_state.items()}
    with outputs.writing(out, state_bytes(export_state), discard=staging):
        if staging.exists():
            shutil.rmtree(staging)
        student.config.use_cache = True
        faults.point("export save")
        student.save_pretrained(staging, state_dict=export_state)
        if template and template.get("chat_template"):
            tokenizer.chat_template = template["chat_template"]
        if template and template.get("eos_token") and tokenizer.eos_token != template["eos_token"]:
            tokenizer.eos_token = template["eos_token"]
        tokenizer.save_pretrained(staging)
        generation_config = getattr(student, "generation_config", None) or GenerationConfig()
        stops = stop_tokens(student, tokenizer, template)
        if stops:
            generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        generation_config.save_pretrained(staging)
        if also_write is not None:
            also_write(staging)
        names = sorted(p.name for p in staging.iterdir())
        names = [n for n in names if n not in EXPORT_FILE_ORDER_LAST] + [
            n for n in EXPORT_FILE_ORDER_LAST if n in names
        ]
        # Recorded before they arrive: --overwrite may then remove any of them.
        outputs.add_marker_files(out, names)
        for name in names:
            faults.point(f"export {name}")
            os.replace(staging / name, out / name)
        staging.rmdir()
    return names


def write_card(out: Path, record: dict[str, Any], evaluation: dict[str, Any] | None = None) -> None:
    """(rank 0) OUT/README.md, the model card of the run's record (and its eval result), and
    OUT/adapter/README.md, the adapter's own card, when --save-adapter wrote one (in place of
    peft's empty template)."""
    from deltakd_cli.train.card import adapter_card, model_card

    outputs.add_marker_files(out, [CARD])
    outputs.atomic_write_text(out / CARD, model_card(record, evaluation))
    if (out / ADAPTER_DIR / "adapter_config.json").is_file():
        outputs.atomic_write_text(out / ADAPTER_DIR / CARD, adapter_card(record))


def write_record(out: Path, record: dict[str, Any]) -> None:
    """(rank 0) OUT/run.json, the run's record, written last: with it OUT is a finished run."""
    outputs.atomic_write_text(out / "run.json", json.dumps(record, indent=2, default=str))
