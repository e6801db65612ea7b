"""The end of a training run: OUT as a Hugging Face model directory plus `run.json`, the run's
record. Files are written to a staging dir and moved in, config.json last and run.json after
it, so a partial OUT neither loads nor looks finished."""

from __future__ import annotations

import json
import os
import shutil
from typing import TYPE_CHECKING, Any

from deltakd_cli import __version__, distributed, faults, models, outputs
from deltakd_cli.options import record
from deltakd_cli.train.checkpoint import state_bytes

if TYPE_CHECKING:
    from deltakd_cli.train.loop import Trainer

EXPORT_FILE_ORDER_LAST = ("config.json",)  # moved last: before it arrives, OUT does not load
# What a training run writes into OUT besides the exported model files (recorded in the
# output marker as they are written): what --overwrite removes, and nothing else.
RUN_FILES = ("checkpoints", "metrics.jsonl", "run.json", ".export.partial")


def export(trainer: Trainer, metrics: dict[str, Any]) -> dict[str, Any]:
    """OUT/ as a Hugging Face model dir plus run.json. Files are written to a staging dir
    and moved in, config.json last and run.json after it, so a partial OUT does not load."""
    model_state = trainer._model_state()
    summary = {
        "tool": "deltakd",
        "version": __version__,
        "command": trainer.options.command,
        "options": record(trainer.options),
        "resolved": {
            "objective": trainer.options.objective,
            "world_size": trainer.world_size,
            "device": str(trainer.device),
            "compute_dtype": str(trainer.compute_dtype).replace("torch.", ""),
            "export_dtype": str(trainer.export_dtype).replace("torch.", ""),
            "total_steps": trainer.total_steps,
            "warmup_steps": trainer.warmup_steps,
            "vocab_size": trainer.vocab_size,
            "use_cached_student": trainer.data.use_cached_student,
            "frozen_student": trainer.data.needs_frozen_student,
        },
        "provenance": trainer.data.provenance,
        "student": None,
        "final_metrics": metrics,
    }
    if trainer.rank == 0:
        summary["student"] = models.model_identity(trainer.options.student, trainer.tokenizer)
        staging = trainer.out / ".export.partial"
        export_state = {k: v.to(trainer.export_dtype) for k, v in model_state.items()}
        with outputs.writing(staging, state_bytes(export_state)):
            if staging.exists():
                shutil.rmtree(staging)
            trainer.student.config.use_cache = True
            faults.point("export save")
            trainer.student.save_pretrained(staging, state_dict=export_state)
            trainer.tokenizer.save_pretrained(staging)
            generation_config = getattr(trainer.student, "generation_config", None)
            if generation_config is not None:
                generation_config.save_pretrained(staging)
            names = sorted(p.name for p in staging.iterdir())
            names = [n for n in names if n not in EXPORT_FILE_ORDER_LAST] + [
                n for n in EXPORT_FILE_ORDER_LAST if n in names
            ]
            # Recorded before they arrive: --overwrite may then remove any of them.
            outputs.add_marker_files(trainer.out, names)
            for name in names:
                faults.point(f"export {name}")
                os.replace(staging / name, trainer.out / name)
            staging.rmdir()
        outputs.atomic_write_text(
            trainer.out / "run.json", json.dumps(summary, indent=2, default=str)
        )
    distributed.barrier()
    return summary
