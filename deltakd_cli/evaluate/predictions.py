"""Reading a JSONL of generations made elsewhere (`eval --predictions`) and matching its lines
to the data rows, by id or by order, with one clear line for every mismatch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deltakd_cli.data import Example
from deltakd_cli.errors import DeltakdError
from deltakd_cli.sources import read_jsonl


def _seed_value(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise DeltakdError(f"{where}: 'seed' must be an integer or null, got {value!r}")


def _read_prediction_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, object) for every non-blank line; each needs a string `prediction`."""
    lines: list[tuple[str, dict[str, Any]]] = []
    for where, entry in read_jsonl(path, "predictions file"):
        if not isinstance(entry, dict):
            raise DeltakdError(f"{where}: expected a JSON object")
        if not isinstance(entry.get("prediction"), str):
            raise DeltakdError(f"{where}: needs a string field 'prediction'")
        lines.append((where, entry))
    if not lines:
        raise DeltakdError(f"{path}: no predictions (the file is empty)")
    return lines


def load_predictions(
    path: str | Path, all_examples: Sequence[Example], rows: int
) -> tuple[list[dict[str, Any]], str]:
    """Predictions aligned to the first `rows` data rows, and how they were matched ("id" or
    "order"). Entries: {row, model, seed, prediction, prompt}, grouped by (model, seed) in file
    order, rows in data order. Lines carrying `id` match data rows by id (ids past `rows`, i.e.
    cut by --limit, are skipped); lines without match by order within their (model, seed) group,
    which must then hold as many lines as the data (or --limit) has rows. Lines without `model`
    belong to a model named after the file. A line's optional `references` must equal the data's.
    The first problem raises one DeltakdError."""
    path = Path(path)
    lines = _read_prediction_lines(path)
    default_model = path.name.removesuffix(".jsonl").removesuffix(".generations")
    with_id = [("id" in entry) for _, entry in lines]
    if any(with_id) and not all(with_id):
        where = lines[with_id.index(False)][0]
        raise DeltakdError(
            f"{where}: no 'id' field, but other lines have one (use ids on all lines or none)"
        )
    by_id = all(with_id)
    row_of_id: dict[str, int] = {}
    if by_id:
        for index, example in enumerate(all_examples):
            if example.id in row_of_id:
                raise DeltakdError(
                    f"the data has the id '{example.id}' twice; match predictions by order instead"
                )
            row_of_id[example.id] = index

    groups: dict[tuple[str, int | None], list[tuple[str, dict[str, Any]]]] = {}
    for where, entry in lines:
        model = entry.get("model", default_model)
        if not isinstance(model, str) or not model:
            raise DeltakdError(f"{where}: 'model' must be a non-empty string")
        seed = _seed_value(entry.get("seed"), where)
        groups.setdefault((model, seed), []).append((where, entry))

    entries = []
    for (model, seed), group in groups.items():
        label = f"model {model}, seed {seed}"
        by_row: dict[int, tuple[str, dict[str, Any]]] = {}
        if by_id:
            for where, entry in group:
                row = row_of_id.get(str(entry["id"]))
                if row is None:
                    raise DeltakdError(f"{where}: id '{entry['id']}' is not in the data")
                if row in by_row:
                    raise DeltakdError(
                        f"{where}: a second prediction for id '{entry['id']}' ({label})"
                    )
                if row < rows:  # rows past --limit are not scored
                    by_row[row] = (where, entry)
        else:
            if len(group) not in (rows, len(all_examples)):
                detail = (
                    f"first extra line {group[rows][0]}"
                    if len(group) > rows
                    else f"first row without one: id '{all_examples[len(group)].id}'"
                )
                raise DeltakdError(
                    f"{path}: {label} has {len(group)} predictions but the data has {rows} rows "
                    f"({detail}); add 'id' fields to match by id"
                )
            by_row = dict(enumerate(group[:rows]))
        missing = [row for row in range(rows) if row not in by_row]
        if missing:
            raise DeltakdError(
                f"{path}: {label} has no prediction for id '{all_examples[missing[0]].id}' "
                f"({len(missing)} of {rows} rows missing)"
            )
        for row in range(rows):
            where, entry = by_row[row]
            stated = entry.get("references")
            if stated is not None and stated != all_examples[row].references:
                # e.g. our own generations file scored against another data file
                raise DeltakdError(
                    f"{where}: its 'references' differ from the data's for id "
                    f"'{all_examples[row].id}' (were these predictions made for this --data?)"
                )
            prompt = entry.get("prompt")
            entries.append(
                {
                    "row": row,
                    "model": model,
                    "seed": seed,
                    "prediction": entry["prediction"],
                    "prompt": prompt if isinstance(prompt, str) else None,
                }
            )
    return entries, "id" if by_id else "order"
