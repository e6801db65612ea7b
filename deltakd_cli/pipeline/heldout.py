"""The pipeline's held-out rows for the held-out loss while training: --validation, or a share
of --train set aside before anything trains on it (never --test, which only the final eval
reads). The split is written as JSONL files of the same raw rows under OUT/data/ and recorded
in OUT/data/split.json; a rerun with the same source and settings reuses it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from deltakd_cli import outputs, sources
from deltakd_cli.console import info
from deltakd_cli.pipeline.options import PipelineOptions
from deltakd_cli.pipeline.plan import training_rows, validation_rows
from deltakd_cli.sources import DataSource

MAX_VALIDATION_ROWS = 1000
HELD_OUT_POINTS = 10  # held-out evaluations per training run when --eval-every is 0
SPLIT_FILE = "split.json"


def split_rows(count: int, fraction: float, seed: int) -> list[int]:
    """Which of `count` rows are held out: round(fraction * count), at most
    MAX_VALIDATION_ROWS, drawn by `seed`, in row order; none when that leaves no training row."""
    held = min(MAX_VALIDATION_ROWS, round(fraction * count))
    if held < 1 or held >= count:
        return []
    order = np.random.default_rng(seed).permutation(count)
    return sorted(int(index) for index in order[:held])


def _write_jsonl(path: Path, rows: list[Any]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    outputs.atomic_write_text(path, text)


def hold_out(options: PipelineOptions) -> dict[str, str]:
    """Split --train into OUT/data/train.jsonl and OUT/data/validation.jsonl (raw rows, so the
    column options still apply) when no --validation is given; {} when nothing is held out."""
    if options.validation is not None or options.validation_fraction <= 0:
        return {}
    source = DataSource(options.train, options.split, options.data_config)
    fingerprint = sources.fingerprint(source)
    data_dir = options.out_path / "data"
    key = {
        "train": options.train,
        "split": options.split,
        "data_config": options.data_config,
        "train_sha256": fingerprint["sha256"],
        "fraction": options.validation_fraction,
        "seed": options.seed,
    }
    paths = {"train": data_dir / "train.jsonl", "validation": data_dir / "validation.jsonl"}
    recorded = data_dir / SPLIT_FILE
    if recorded.is_file() and all(path.is_file() for path in paths.values()):
        try:
            done = json.loads(recorded.read_text())
        except json.JSONDecodeError:
            done = {}
        if done.get("key") == key:
            return {name: str(path) for name, path in paths.items()}
    rows = [row for _, row in sources.read_rows(source, "--train")]
    held = split_rows(len(rows), options.validation_fraction, options.seed)
    if not held:
        info(
            f"[yellow]note:[/yellow] {len(rows)} training rows: too few to hold out "
            f"{options.validation_fraction:.0%}; no held-out loss (give --validation)"
        )
        return {}
    held_set = set(held)
    data_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(paths["train"], [row for i, row in enumerate(rows) if i not in held_set])
    _write_jsonl(paths["validation"], [rows[i] for i in held])
    split = {
        "key": key,
        "rule": f"{len(held)} of {len(rows)} --train rows drawn with numpy "
        f"default_rng({options.seed}).permutation; the rest train every stage",
        "rows": len(rows),
        "validation_rows": held,
        "files": {name: str(path) for name, path in paths.items()},
    }
    outputs.atomic_write_text(recorded, json.dumps(split, indent=2) + "\n")
    info(
        f"held out {len(held)} of {len(rows)} training rows for the held-out loss: "
        f"{paths['validation']} (never the test rows)"
    )
    return {name: str(path) for name, path in paths.items()}


def resolve_eval_every(options: PipelineOptions) -> int:
    """--eval-every, or (0) about HELD_OUT_POINTS held-out evaluations per student run."""
    if options.eval_every or validation_rows(options) is None:
        return options.eval_every
    train = training_rows(options)
    source = DataSource(train["data"], train["split"], train["data_config"])
    count = sum(1 for _ in sources.read_rows(source, "--train"))
    per_step = options.batch_size * options.grad_accum * options.nproc
    steps = math.ceil(count / per_step) * options.epochs
    return max(1, steps // HELD_OUT_POINTS)
