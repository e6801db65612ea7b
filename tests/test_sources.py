"""sources.py and the data options: the same rows given as JSONL, a JSON array, parquet, CSV and
a saved `datasets` directory make the same cache, byte for byte; column mapping; and every bad
source is one clear line naming what there is."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_rows
from helpers import assert_one_line_error, cache_args, run_cli

from deltakd_cli.errors import DeltakdError
from deltakd_cli.sources import DataSource, fingerprint, read_rows

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("one_thread")


def shard_arrays(cache) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(str(next((cache / "shards").glob("*.zarr"))), mode="r")
    return {name: group[name][:] for name in group.array_keys()}


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The same 16 rows in every format."""
    root = tmp_path_factory.mktemp("formats")
    rows = make_rows(16, seed=21)
    jsonl = root / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    array = root / "rows.json"
    array.write_text(json.dumps(rows))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(root / "rows.parquet"))
    table.to_csv(str(root / "rows.csv"), index=False)
    datasets.DatasetDict({"train": table, "test": table.select(range(4))}).save_to_disk(
        str(root / "saved")
    )
    renamed = datasets.Dataset.from_list(
        [{"question": r["prompt"], "answer": r["response"], "id": r["id"]} for r in rows]
    )
    renamed.to_parquet(str(root / "renamed.parquet"))
    return root


def test_every_format_reads_the_same_rows(formats):
    expected = [row for _, row in read_rows(DataSource(str(formats / "rows.jsonl")))]
    for name, split in (("rows.json", None), ("rows.parquet", None), ("rows.csv", None),
                        ("saved", "train")):  # fmt: skip
        got = [row for _, row in read_rows(DataSource(str(formats / name), split))]
        assert got == expected, name
    where = next(read_rows(DataSource(str(formats / "rows.parquet"))))[0]
    assert where == f"{formats / 'rows.parquet'}[row 0]"
    assert fingerprint(DataSource(str(formats / "saved"), "train"))["sha256"]


@pytest.mark.parametrize(
    "name, extra",
    [
        ("rows.json", []),
        ("rows.parquet", []),
        ("rows.csv", []),
        ("saved", ["--split", "train"]),
        ("renamed.parquet", ["--prompt-field", "question", "--response-field", "answer"]),
    ],
)
def test_the_same_cache_from_every_format(tiny, formats, tmp_path, name, extra):
    reference = formats / "cache-jsonl"
    if not reference.exists():
        result = run_cli(
            cache_args(tiny, reference, "--top-k", 8, "--data", formats / "rows.jsonl")
        )
        assert result.exit_code == 0, result.output
    out = tmp_path / "cache"
    result = run_cli(cache_args(tiny, out, "--top-k", 8, "--data", formats / name, *extra))
    assert result.exit_code == 0, result.output
    expected, got = shard_arrays(reference), shard_arrays(out)
    assert expected.keys() == got.keys()
    for array in expected:
        assert np.array_equal(expected[array], got[array]), array


def test_bad_sources_are_one_line(tiny, formats, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [
        (["--data", "no-such-org/no-such-dataset"], "HF_HUB_OFFLINE is set"),
        (["--data", formats / "saved"], "has the splits test, train: give --split"),
        (["--data", formats / "saved", "--split", "validation"], "no split 'validation'"),
        (["--data", formats / "rows.parquet", "--split", "train"], "one file, it has no splits"),
        (["--data", formats / "renamed.parquet", "--prompt-field", "q"],
         "no column 'q' (--prompt-field); the columns are: answer, id, question"),
        (["--data", formats / "renamed.parquet"], "unrecognised row (keys: answer, id, question)"),
    ]  # fmt: skip
    for extra, message in cases:
        result = run_cli(cache_args(tiny, tmp_path / "c", "--top-k", 4, *extra))
        assert_one_line_error(result, message)
    empty = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"prompt": [], "response": []}).to_parquet(str(empty))
    assert_one_line_error(run_cli(cache_args(tiny, tmp_path / "c", "--data", empty)), "no rows")
    missing = tmp_path / "missing.parquet"
    assert_one_line_error(run_cli(cache_args(tiny, tmp_path / "c", "--data", missing)),
                          "not found")  # fmt: skip


def test_a_directory_that_is_not_a_saved_dataset(tmp_path):
    with pytest.raises(DeltakdError, match="not one saved with datasets.save_to_disk"):
        _ = DataSource(str(tmp_path)).kind
