"""The options of `deltakd init-student`, written once (options.py derives the command line,
the checks and the record from them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from deltakd_cli.method.rules import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K
from deltakd_cli.option_groups import (
    DataOptions,
    DeviceOptions,
    DistributedOptions,
    ModelLoadOptions,
)
from deltakd_cli.options import opt

LAYER_RULES = ("auto", "block-influence", "uniform")


@dataclass(kw_only=True)
class InitStudentOptions(DataOptions, DeviceOptions, ModelLoadOptions, DistributedOptions):
    """Make a base student: keep some layers of a model, then heal the copy by KD from it."""

    command: ClassVar[str] = "init-student"

    source: str = opt(
        help="Model to take layers from: HF dir, hub id, or .gguf (pipeline: --student-from).",
        flags=("--student-from",), aliases=("--source",),
    )  # fmt: skip
    out: str = opt(
        help="Output: the base student, a Hugging Face directory.", local="output folder"
    )
    layers: int | None = opt(
        None, help="Layers to keep, evenly spaced first to last (default: a third).", at_least=1
    )
    keep_layers: str | None = opt(
        None, help="Exactly which source layers to keep, e.g. 0,3,6-9,29 (instead of --layers)."
    )
    layer_rule: str = opt(
        "auto",
        help="block-influence (keep the layers that change their input most, measured on the "
        "healing text), uniform (evenly spaced), or auto (block-influence with --heal-data).",
        choices=LAYER_RULES,
    )
    heal_data: str | None = opt(
        None,
        help="Unlabelled text to heal on by KD from the source: rows with 'text' (JSONL, "
        "parquet, CSV, datasets), a .txt file (one document per line), or task rows. Without it "
        "the copy is not healed.",
    )
    work_dir: str | None = opt(
        None,
        help="Pruned copy, healing cache and checkpoints (default: OUT.init).",
        local="output folder",
    )
    heal_epochs: int = opt(1, help="Passes over the healing text.", at_least=1)
    heal_steps: int = opt(0, help="Healing optimizer steps; > 0 overrides epochs.", at_least=0)
    lr: float = opt(1e-4, help="Peak learning rate of healing (AdamW).", above=0, finite=True)
    warmup: float = opt(0.05, help="Warmup: steps (>= 1) or a fraction (< 1).", at_least=0)
    batch_size: int = opt(8, help="Healing examples per optimizer step.", at_least=1)
    max_length: int = opt(256, help="Tokens per healing document.", at_least=2)
    top_k: int = opt(
        DEFAULT_TOP_K, help="Ids of the source's distribution kept per position.", at_least=1
    )
    tail_samples: int | None = opt(
        None,
        help=f"Ids drawn per position from the source's tail outside the top-k (0: a tail "
        f"bucket; default {DEFAULT_TAIL_SAMPLES} where the top-k leaves a tail).",
        at_least=0,
    )
    sft_weight: float = opt(
        0.0, help="Weight of cross-entropy on the text, 0..1.", at_least=0, at_most=1
    )
    seed: int = opt(0, help="Seed of the healing run.")
    save_every: int = opt(500, help="Healing checkpoint every N steps (0: never).", at_least=0)
    overwrite: bool = opt(False, help="Replace an OUT made with other settings.")
    cache_batch_size: int = opt(8, cli=False, at_least=1)  # the healing cache's forward batch
    num_workers: int = opt(0, cli=False, at_least=0)  # DataLoader workers of the healing run

    @property
    def work_path(self) -> Path:
        if self.work_dir:
            return Path(self.work_dir)
        out = Path(self.out)
        return out.with_name(out.name + ".init")
