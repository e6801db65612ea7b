"""The rows the pipeline sets aside from --train before anything trains on it: the test rows
of --test-rows / --test-fraction (read only by the final eval), and the held-out rows of the
held-out loss while training (--validation-fraction, unless --validation is given; never the
test rows). The split is written as JSONL files of the same raw rows under OUT/data/ and
recorded in OUT/data/split.json (seeds, sizes, the row numbers and ids of each part); a rerun
with the same source and settings reuses it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deltakd_cli import outputs, sources
from deltakd_cli.console import info
from deltakd_cli.errors import DeltakdError
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


def test_size(count: int, rows: int | None, fraction: float | None) -> int:
    """How many of `count` rows --test-rows / --test-fraction cut (0: neither is given); at
    least one, and refused when it would leave no row to train on."""
    if rows is None and fraction is None:
        return 0
    size = rows if rows is not None else max(1, round(fraction * count))  # type: ignore[operator]
    asked = f"--test-rows {rows}" if rows is not None else f"--test-fraction {fraction}"
    if size >= count:
        raise DeltakdError(
            f"{asked} leaves no training row: --train has {count} row{'s' * (count != 1)}"
        )
    return size


@dataclass(frozen=True)
class Split:
    """Row numbers (0-based, in --train's order) of each part: disjoint, together every row."""

    test: list[int]
    validation: list[int]
    train: list[int]


def cut_split(
    count: int, test: int, validation_fraction: float, test_seed: int, validation_seed: int
) -> Split:
    """`test` rows drawn from all `count` by numpy default_rng(test_seed).permutation, then the
    held-out rows (split_rows, by `validation_seed`) drawn from what is left, the rest to train.
    The test rows depend only on the count, their number and their seed, never on the
    validation settings or the training seed."""
    order = np.random.default_rng(test_seed).permutation(count)
    test_rows = sorted(int(index) for index in order[:test])
    taken = set(test_rows)
    rest = [index for index in range(count) if index not in taken]
    validation_rows = [rest[i] for i in split_rows(len(rest), validation_fraction, validation_seed)]
    taken.update(validation_rows)
    return Split(test_rows, validation_rows, [i for i in range(count) if i not in taken])


def _write_jsonl(path: Path, rows: list[Any]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    outputs.atomic_write_text(path, text)


def _ids(rows: list[Any], numbers: list[int]) -> list[str]:
    """The example ids of these rows: a row's own "id", else its row number (data.py's rule)."""
    return [
        str(rows[n]["id"]) if isinstance(rows[n], dict) and "id" in rows[n] else str(n)
        for n in numbers
    ]


def hold_out(options: PipelineOptions) -> dict[str, str]:
    """Split --train into OUT/data/train.jsonl and, as asked, OUT/data/test.jsonl (--test-rows,
    --test-fraction) and OUT/data/validation.jsonl (--validation-fraction without --validation):
    raw rows, so the column options still apply. {} when nothing is set aside."""
    hold_validation = options.validation is None and options.validation_fraction > 0
    cut_test = options.test_rows is not None or options.test_fraction is not None
    if not (hold_validation or cut_test):
        return {}
    source = DataSource(options.train, options.split, options.data_config)
    fingerprint = sources.fingerprint(source)
    data_dir = options.out_path / "data"
    key = {
        "train": options.train,
        "split": options.split,
        "data_config": options.data_config,
        "train_sha256": fingerprint["sha256"],
        "fraction": options.validation_fraction if hold_validation else 0,
        "seed": options.seed,
        "test_rows": options.test_rows,
        "test_fraction": options.test_fraction,
        "test_seed": options.test_seed,
    }
    recorded = data_dir / SPLIT_FILE
    if recorded.is_file():
        try:
            done = json.loads(recorded.read_text())
        except json.JSONDecodeError:
            done = {}
        files = done.get("files", {})
        if done.get("key") == key and all(Path(path).is_file() for path in files.values()):
            return files
    rows = [row for _, row in sources.read_rows(source, "--train")]
    size = test_size(len(rows), options.test_rows, options.test_fraction)
    fraction = options.validation_fraction if hold_validation else 0.0
    split = cut_split(len(rows), size, fraction, options.test_seed, options.seed)
    if hold_validation and not split.validation:
        info(
            f"[yellow]note:[/yellow] {len(split.train)} training rows: too few to hold out "
            f"{options.validation_fraction:.0%}; no held-out loss (give --validation)"
        )
        if not cut_test:
            return {}
    parts = {"train": split.train, "validation": split.validation, "test": split.test}
    paths = {name: data_dir / f"{name}.jsonl" for name, numbers in parts.items() if numbers}
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        _write_jsonl(path, [rows[n] for n in parts[name]])
    for name in parts.keys() - paths.keys():  # a part an earlier split of other settings had
        (data_dir / f"{name}.jsonl").unlink(missing_ok=True)
    files = {name: str(path) for name, path in paths.items()}
    record = {
        "key": key,
        "rule": f"of {len(rows)} --train rows: {len(split.test)} test rows drawn with numpy "
        f"default_rng({options.test_seed}).permutation, then {len(split.validation)} held-out "
        f"rows drawn from the rest with default_rng({options.seed}).permutation; the other "
        f"{len(split.train)} train every stage",
        "rows": len(rows),
        "test": {
            "seed": options.test_seed,
            "rows": len(split.test),
            "row_numbers": split.test,
            "ids": _ids(rows, split.test),
        }
        if cut_test
        else None,
        "validation_rows": split.validation,
        "validation_ids": _ids(rows, split.validation),
        "train_rows": len(split.train),
        "files": files,
    }
    outputs.atomic_write_text(recorded, json.dumps(record, indent=2) + "\n")
    if split.test:
        info(
            f"cut {len(split.test)} of {len(rows)} training rows as the test rows: "
            f"{paths['test']} (seed {options.test_seed}; never trained on)"
        )
    if split.validation:
        info(
            f"held out {len(split.validation)} of {len(rows)} training rows for the held-out "
            f"loss: {paths['validation']} (never the test rows)"
        )
    return files


def split_record(options: PipelineOptions) -> dict[str, Any] | None:
    """What OUT/data/split.json records of the rows this run set aside from --train, without
    its key (None when it set none aside)."""
    if not options.held_out:
        return None
    recorded = json.loads((options.out_path / "data" / SPLIT_FILE).read_text())
    return {name: value for name, value in recorded.items() if name != "key"}


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
