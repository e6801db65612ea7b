"""sources.py and the data options: the same rows given as JSONL, a JSON array, parquet, CSV and
a saved `datasets` directory make the same cache, byte for byte; column mapping; and every bad
source is one clear line naming what there is."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_rows, write_jsonl
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


# ----------------------------------------------------------------------------- what a path is


def test_a_path_that_is_not_a_readable_file_is_named_for_what_it_is(tmp_path):
    import os

    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    dangling = tmp_path / "gone.jsonl"
    dangling.symlink_to(tmp_path / "deleted.jsonl")
    cases = {
        fifo: "is not a regular file (a FIFO",
        dangling: "is a broken symlink (to",
        tmp_path / "missing.jsonl": "data file not found",
    }
    for path, words in cases.items():
        with pytest.raises(DeltakdError) as error:
            list(read_rows(DataSource(str(path))))
        assert words in str(error.value) and "\n" not in str(error.value)
        if path != fifo:  # never opened: a FIFO would block
            with pytest.raises(DeltakdError, match=words.split(" (")[0]):
                fingerprint(DataSource(str(path)))


def test_a_jsonl_file_with_a_byte_order_mark_is_read(tmp_path):
    rows = make_rows(3, seed=4)
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    assert [row for _, row in read_rows(DataSource(str(path)))] == rows
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    assert [row for _, row in read_rows(DataSource(str(array)))] == rows


def test_text_no_utf8_file_can_hold_is_refused_naming_row_and_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = json.dumps(make_rows(1, seed=5)[0])
    path.write_text(good + "\n" + '{"prompt": "p", "response": "bad \\ud800 text"}\n')
    with pytest.raises(DeltakdError) as error:
        list(read_rows(DataSource(str(path))))
    message = str(error.value)
    assert f"{path}:2" in message and "'response'" in message and "lone surrogate" in message


def test_a_nul_in_a_row_is_text_and_passes_through(tiny, tmp_path):
    rows = make_rows(4, seed=7)
    rows[1]["response"] = "before\x00after"
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert [row for _, row in read_rows(DataSource(str(path)))][1]["response"] == "before\x00after"
    result = run_cli(cache_args(tiny, tmp_path / "cache", "--data", path))
    assert result.exit_code == 0, result.output


def test_lone_surrogates_are_one_line_in_cache_teachers_and_eval_predictions(tiny, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(make_rows(1, seed=6)[0]) + "\n" + '{"prompt": "\\ud800", '
                    '"response": "r"}\n')  # fmt: skip
    result = run_cli(cache_args(tiny, tmp_path / "cache", "--data", rows))
    assert_one_line_error(result, "lone surrogate", f"{rows}:2")
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"id": "0", "prediction": "x \\udfff"}\n')
    result = run_cli(["eval", "--predictions", predictions, "--data", tiny.test])
    assert_one_line_error(result, "lone surrogate", f"{predictions}:1")


BAD_ROWS = {
    "invalid UTF-8": (b'{"prompt": "p", "response": "caf\xe9"}\n', "not UTF-8 text"),
    "a lone surrogate": (b'{"prompt": "p", "response": "\\udfff"}\n', "lone surrogate"),
    "a key twice": (b'{"prompt": "p", "response": "r", "response": "s"}\n', "appears twice"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_row_is_one_line_naming_it_in_every_command(tiny, tmp_path, case):
    bad, words = BAD_ROWS[case]
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(json.dumps(make_rows(1, seed=6)[0]).encode() + b"\n" + bad)
    commands = {
        "cache-teachers": cache_args(tiny, tmp_path / "cache", "--data", rows),
        "eval": ["eval", "--model", tiny.student, "--data", rows, "--protocol", "greedy",
                 "--max-new-tokens", 2, "--device", "cpu", "--out", tmp_path / "r.json"],
        "finetune": ["finetune", "--model", tiny.student, "--data", rows, "--out",
                     tmp_path / "tuned", "--max-steps", 1, "--device", "cpu"],
    }  # fmt: skip
    for args in commands.values():
        assert_one_line_error(run_cli(args), words, f"{rows}:2")
    array = tmp_path / "rows.json"  # the same row in a JSON array: the line is named
    array.write_bytes(b"[\n" + json.dumps(make_rows(1, seed=6)[0]).encode() + b",\n" + bad + b"]")
    assert_one_line_error(run_cli(commands["eval"][:4] + [array] + commands["eval"][5:]), words)
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_bytes(b'{"id": "0", "prediction": "x"}\n' + bad.replace(b"prompt", b"id"))
    result = run_cli(["eval", "--predictions", predictions, "--data", tiny.test])
    assert_one_line_error(result, words, f"{predictions}:2")


def test_a_column_named_twice_is_refused_in_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as parquet

    pytest.importorskip("datasets")
    table = pa.Table.from_arrays([pa.array(["p"]), pa.array(["r"]), pa.array(["s"])],
                                 names=["prompt", "response", "response"])  # fmt: skip
    parquet.write_table(table, tmp_path / "rows.parquet")
    (tmp_path / "rows.csv").write_text("prompt,response,response\np,r,s\n")
    (tmp_path / "rows.tsv").write_text("prompt\tprompt\tresponse\np\tq\tr\n")
    (tmp_path / "rows.json").write_text('[\n{"prompt": "p", "prompt": "q", "response": "r"}\n]\n')
    for name, repeated in [("rows.parquet", "'response' (2 times)"),
                           ("rows.csv", "'response' (2 times)"),
                           ("rows.tsv", "'prompt' (2 times)"),
                           ("rows.json", "'prompt' appears twice")]:  # fmt: skip
        with pytest.raises(DeltakdError) as error:
            list(read_rows(DataSource(str(tmp_path / name))))
        assert repeated in str(error.value) and str(tmp_path / name) in str(error.value)


def test_a_duplicate_parquet_column_is_one_line_on_the_command_line(tiny, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as parquet

    pytest.importorskip("datasets")
    table = pa.Table.from_arrays([pa.array(["p"]), pa.array(["q"]), pa.array(["r"])],
                                 names=["prompt", "prompt", "response"])  # fmt: skip
    parquet.write_table(table, tmp_path / "rows.parquet")
    result = run_cli(cache_args(tiny, tmp_path / "cache", "--data", tmp_path / "rows.parquet"))
    assert_one_line_error(result, "more than one column named 'prompt' (2 times)")
