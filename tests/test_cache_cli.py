"""cache-teachers and inspect from the command line: bad input gets one line and exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import build_model, write_jsonl
from helpers import assert_one_line_error, cache_args, flat, run_cli, run_module


@pytest.fixture(scope="module")
def good_cache(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "cache"
    result = run_cli(cache_args(tiny, out, "--top-k", 4))
    assert result.exit_code == 0, result.output
    return out


def test_malformed_jsonl_names_the_line(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp\n')
    result = run_cli(cache_args(tiny, tmp_path / "c", "--top-k", 4) + ["--data", str(bad)])
    assert_one_line_error(result, "bad.jsonl:2", "not valid JSON")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "hello"}, "no response"),
        ({"prompt": "hello", "response": "   "}, "response is empty"),
        ({"question": "x"}, "unrecognised row"),
        ({"instruction": 3, "output": "x"}, "must be a string"),
    ],
)
def test_bad_rows(tiny, tmp_path, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a b", "response": "c"}, row])
    result = run_cli(cache_args(tiny, tmp_path / "c", "--top-k", 4) + ["--data", str(path)])
    assert_one_line_error(result, "rows.jsonl:2", message)


def test_missing_data_file(tiny, tmp_path):
    result = run_cli(cache_args(tiny, tmp_path / "c") + ["--data", str(tmp_path / "none.jsonl")])
    assert_one_line_error(result, "data file not found")


def test_missing_model_path(tiny, tmp_path):
    args = cache_args(tiny, tmp_path / "c")
    args[args.index("--teacher-tuned") + 1] = str(tmp_path / "no-such-model")
    assert_one_line_error(run_cli(args), "model not found", "no-such-model")


def test_k_larger_than_vocabulary(tiny, tmp_path):
    result = run_cli(cache_args(tiny, tmp_path / "c", "--top-k", tiny.vocab_size + 1))
    assert_one_line_error(result, "larger than the vocabulary", str(tiny.vocab_size))
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_bad_numbers_and_choices(tiny, tmp_path):
    assert_one_line_error(run_cli(cache_args(tiny, tmp_path / "c", "--top-k", 0)), "--top-k")
    assert_one_line_error(
        run_cli(cache_args(tiny, tmp_path / "c", "--template", "nope")), "--template"
    )
    assert_one_line_error(
        run_cli(cache_args(tiny, tmp_path / "c", "--selection", "target", student=False)),
        "need --student",
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--gammas", "0,1.5"), "between 0 and 1"),
        (("--gammas", "-0.1"), "between 0 and 1"),
        (("--gammas", "0,half"), "'half' is not a number"),
        (("--gammas", ""), "--gammas is empty"),
        (("--gammas", " , "), "--gammas is empty"),
        (("--gammas", "0,,1"), "'' is not a number"),
        (("--gammas", "0,0"), "given twice"),
        (("--alphas", "1,nan"), "not a finite number"),
        (("--selection", "grid"), "needs a grid"),
    ],
)
def test_bad_kd_to_delta_grid(tiny, tmp_path, extra, message):
    assert_one_line_error(run_cli(cache_args(tiny, tmp_path / "c", *extra)), message)
    assert not (tmp_path / "c").exists()


def test_a_grid_needs_the_student(tiny, tmp_path):
    result = run_cli(cache_args(tiny, tmp_path / "c", "--gammas", "0,1", student=False))
    assert_one_line_error(result, "--gammas/--alphas need --student")


def test_tokenizer_mismatch(tiny, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.BPE(unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other.train_from_iterator(
        ["completely different words here"] * 10,
        trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<|im_end|>"]),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=other, eos_token="<|im_end|>", unk_token="<unk>"
    )
    alien = build_model(tmp_path / "alien", fast, 1, 32, seed=5)
    args = cache_args(tiny, tmp_path / "c")
    args[args.index("--student") + 1] = str(alien)
    assert_one_line_error(run_cli(args), "tokenizer mismatch", "student")


def test_padded_vocabulary_is_accepted(tiny, tmp_path):
    """An output layer with more rows than the tokenizer has tokens (e.g. 152,064 over 151,936)."""
    padded = build_model(tmp_path / "padded", tiny.tokenizer, 1, 32, seed=6,
                         vocab_rows=tiny.vocab_size + 64)  # fmt: skip
    args = cache_args(tiny, tmp_path / "c", "--top-k", 4)
    args[args.index("--student") + 1] = str(padded)
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["vocab_size"] == tiny.vocab_size


def test_existing_cache_with_other_settings_is_refused(tiny, good_cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(good_cache, copy)
    result = run_cli(cache_args(tiny, copy, "--top-k", 6))
    assert_one_line_error(result, "other settings", "top_k differs", "--overwrite")
    assert (copy / "manifest.json").exists()  # nothing lost
    result = run_cli(cache_args(tiny, copy, "--top-k", 6, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert json.loads((copy / "manifest.json").read_text())["top_k"] == 6


def test_same_settings_on_a_complete_cache_is_a_no_op(tiny, good_cache):
    before = (good_cache / "manifest.json").read_text()
    result = run_cli(cache_args(tiny, good_cache, "--top-k", 4))
    assert result.exit_code == 0 and "already complete" in result.output
    assert (good_cache / "manifest.json").read_text() == before


def test_refuses_a_directory_that_is_not_a_cache(tiny, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    result = run_cli(cache_args(tiny, tmp_path / "precious", "--top-k", 4))
    assert_one_line_error(result, "did not create (notes.txt)", "not taken for the cache")
    assert sorted(p.name for p in (tmp_path / "precious").iterdir()) == ["notes.txt"]
    # --overwrite never writes into a folder deltakd did not create
    result = run_cli(cache_args(tiny, tmp_path / "precious", "--top-k", 4, "--overwrite"))
    assert_one_line_error(result, "did not create (notes.txt)", "--overwrite never touches")
    assert sorted(p.name for p in (tmp_path / "precious").iterdir()) == ["notes.txt"]


def test_inspect_summary_json_and_example(good_cache):
    result = run_cli(["inspect", str(good_cache), "--json", "--verify"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["verified"] is True and summary["top_k"] == 4
    assert summary["bytes_per_response_token"] > 0
    result = run_cli(["inspect", str(good_cache), "--example", "2", "--json"])
    decoded = json.loads(result.output)
    assert decoded["example_index"] == 2
    first = decoded["positions"][0]
    prompt_length = decoded["target_mask"].index(1)
    assert first["position"] == prompt_length - 1
    assert set(first) >= {"ids", "tuned_logprobs", "base_logprobs", "tuned_tail", "base_tail",
                          "student_logprobs", "student_tail"}  # fmt: skip
    assert len(first["ids"]) == 4
    assert len(decoded["positions"]) == len(decoded["input_ids"]) - prompt_length


def test_inspect_example_shows_token_text_and_a_position_limit(tiny, good_cache):
    """Token text next to the ids, decoded independently by the fixture's tokenizer; the table
    shows a few positions (--positions N for more), the JSON all unless limited."""
    decoded = json.loads(run_cli(["inspect", good_cache, "--example", 1, "--json"]).output)
    tokenizer = tiny.tokenizer
    assert decoded["tokens"] == tokenizer.convert_ids_to_tokens(decoded["input_ids"])
    first = decoded["positions"][0]
    assert first["ids_text"] == tokenizer.convert_ids_to_tokens(first["ids"])
    every = len(decoded["positions"])
    assert every == decoded["target_positions"] > 3
    limited = run_cli(["inspect", good_cache, "--example", 1, "--json", "--positions", 3])
    assert len(json.loads(limited.output)["positions"]) == 3
    table = run_cli(["inspect", good_cache, "--example", 1, "--positions", 2])
    assert table.exit_code == 0, table.output
    assert f"{every - 2} more target positions" in flat(table.output)
    assert repr(first["ids_text"][0]) in table.output
    assert_one_line_error(run_cli(["inspect", good_cache, "--positions", 2]), "needs --example")


def test_inspect_verify_names_a_damaged_shard(good_cache, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(good_cache, copy)
    chunk = next(
        p for p in sorted((copy / "shards").rglob("*")) if p.is_file() and "/ids/c" in str(p)
    )
    chunk.write_bytes(chunk.read_bytes()[:-3] + b"xyz")
    result = run_cli(["inspect", str(copy), "--verify"])
    assert_one_line_error(result, "damaged shards", "shard-00000-of-00001")


def test_inspect_refuses_unfinished_and_missing(tiny, tmp_path):
    assert_one_line_error(run_cli(["inspect", str(tmp_path / "nothing")]), "cache not found")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "settings.json").write_text("{}")
    assert_one_line_error(run_cli(["inspect", str(tmp_path / "half")]), "unfinished cache")


@pytest.mark.slow
def test_python_dash_m_entry_point(good_cache):
    result = run_module(["inspect", str(good_cache), "--json"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["top_k"] == 4
    result = run_module(["inspect", str(good_cache) + "-nope"])
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_fsspec_url_output_round_trips(tiny, good_cache):
    """--out takes an fsspec URL (here the in-memory filesystem) and the reader reads it back."""
    from deltakd_cli.cache.reader import CacheReader

    url = "memory://deltakd-test/cache"
    result = run_cli(cache_args(tiny, url, "--top-k", 4))
    assert result.exit_code == 0, result.output
    remote, local = CacheReader(url), CacheReader(str(good_cache))
    assert remote.verify() == []
    assert remote.manifest["counts"] == local.manifest["counts"]
    first_remote = remote.read_examples(0, 0, 3)
    first_local = local.read_examples(0, 0, 3)
    for a, b in zip(first_remote, first_local, strict=True):
        assert (a.targets.ids == b.targets.ids).all()
        assert (a.targets.tuned_logprobs == b.targets.tuned_logprobs).all()


def _location_of(kind: str, tmp_path, request) -> str:
    if kind == "disk":
        return str(tmp_path / "cache")
    if kind == "memory":
        return f"memory://deltakd-resume-{tmp_path.name}/cache"
    return request.getfixturevalue("s3").url(f"resume-{tmp_path.name}/cache")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["disk", "memory", "s3"])
def test_resume_recomputes_a_chunk_missing_under_a_finished_progress_file(
    tiny, tmp_path, request, kind
):
    """A resume verifies what progress.json calls done: with manifest.json and one chunk deleted,
    the same command writes the chunk again and the cache verifies, the same bytes as before."""
    import fsspec

    out = _location_of(kind, tmp_path, request)
    args = cache_args(tiny, out, "--top-k", 4, "--batch-size", 4)
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    fs, root = fsspec.core.url_to_fs(out)
    manifest = json.loads(fs.cat(f"{root}/manifest.json"))
    before = [(s["name"], s["sha256"]) for s in manifest["shards"]]
    fs.rm(f"{root}/manifest.json")
    fs.rm(f"{root}/shards/shard-00000-of-00001.zarr/tuned_logprobs/c/0/0")

    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert "tuned_logprobs" in flat(result.output)  # the resume names what it recomputes
    result = run_cli(["inspect", out, "--verify"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(fs.cat(f"{root}/manifest.json"))
    assert [(s["name"], s["sha256"]) for s in manifest["shards"]] == before


def test_no_manifest_over_a_shard_the_readers_would_refuse(tiny, tmp_path, monkeypatch):
    """The manifest (what makes a cache complete) is written only after the readers' own
    structural check: a chunk lost between the writer's close and the manifest is refused."""
    from deltakd_cli.cache.writer import ShardWriter

    close = ShardWriter.close

    def close_then_lose_a_chunk(self):
        committed = close(self)
        chunk = tmp_path / "c" / self.group_path / "base_logprobs" / "c" / "0" / "0"
        chunk.unlink()
        return committed

    monkeypatch.setattr(ShardWriter, "close", close_then_lose_a_chunk)
    result = run_cli(cache_args(tiny, tmp_path / "c", "--top-k", 4))
    assert_one_line_error(result, "base_logprobs has 0 of its 1 chunk files")
    assert not (tmp_path / "c" / "manifest.json").exists()
