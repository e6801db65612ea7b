"""cache-teachers end to end on the tiny models, against an independent full-vocabulary forward."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import write_jsonl
from helpers import assert_one_line_error, cache_args, flat, run_cli
from transformers import AutoModelForCausalLM

from deltakd_cli import data, models, sources
from deltakd_cli.cache.manifest import manifest_checksum
from deltakd_cli.cache.reader import CacheReader


def reference_logprobs(model_dir, input_ids: np.ndarray) -> torch.Tensor:
    """log_softmax of a plain forward of one unpadded example: [L, V]."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor(input_ids)[None]).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.fixture(scope="module")
def exact_cache(tiny, tmp_path_factory):
    """k = |V|, float32 storage: the cache must be the full distributions."""
    out = tmp_path_factory.mktemp("exact") / "cache"
    args = cache_args(tiny, out, "--top-k", tiny.vocab_size, "--precision", "float32",
                      "--batch-size", 5)  # fmt: skip
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    return CacheReader(str(out))


@pytest.fixture(scope="module")
def sparse_cache(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse") / "cache"
    result = run_cli(cache_args(tiny, out, "--top-k", 8, "--batch-size", 3))
    assert result.exit_code == 0, result.output
    return CacheReader(str(out))


def all_examples(reader: CacheReader):
    for shard in range(reader.num_shards):
        yield from reader.read_examples(shard, 0, len(reader.shard_lengths(shard)))


def test_tokens_and_targets_match_the_data(tiny, sparse_cache):
    tokenizer = models.load_tokenizer(str(tiny.teacher_base))
    expected = data.tokenize_all(data.load_examples(tiny.train), "alpaca", tokenizer, 1024)
    seen = set()
    for example in all_examples(sparse_cache):
        reference = expected[example.example_index]
        assert example.input_ids.tolist() == reference.input_ids
        assert example.target_mask.tolist() == reference.target_mask
        assert len(example.targets.ids) == reference.num_targets
        seen.add(example.example_index)
    assert seen == set(range(len(expected)))
    assert sparse_cache.manifest["counts"]["response_tokens"] == sum(
        e.num_targets for e in expected
    )


def test_stored_logprobs_match_independent_forward(tiny, sparse_cache):
    for example in list(all_examples(sparse_cache))[:6]:
        positions = torch.tensor(example.target_positions)
        ids = torch.tensor(example.targets.ids)
        for model_dir, stored, tail in (
            (tiny.teacher_tuned, example.targets.tuned_logprobs, example.targets.tuned_tail),
            (tiny.teacher_base, example.targets.base_logprobs, example.targets.base_tail),
            (tiny.student, example.targets.student_logprobs, example.targets.student_tail),
        ):
            full = reference_logprobs(model_dir, example.input_ids)[positions]
            at_ids = full.gather(1, ids)
            # float16 storage: log-probs to ~1e-2 absolute at these magnitudes
            np.testing.assert_allclose(stored, at_ids.numpy(), atol=2e-2, rtol=1e-3)
            expected_tail = 1.0 - at_ids.exp().sum(dim=1)
            np.testing.assert_allclose(tail, expected_tail.numpy(), atol=1e-5)


def test_kept_ids_are_the_top_of_the_exact_target(tiny, sparse_cache):
    """Default with --student: K = top-k of p* = softmax(l0 + alpha (lT - lB))."""
    example = next(all_examples(sparse_cache))
    positions = torch.tensor(example.target_positions)
    tuned = reference_logprobs(tiny.teacher_tuned, example.input_ids)[positions]
    base = reference_logprobs(tiny.teacher_base, example.input_ids)[positions]
    student = reference_logprobs(tiny.student, example.input_ids)[positions]
    target = torch.log_softmax(student + tuned - base, dim=-1)
    top = target.topk(sparse_cache.top_k, dim=-1).indices.sort(dim=-1).values
    assert (torch.tensor(example.targets.ids) == top).float().mean() > 0.99  # near-ties may swap
    assert sparse_cache.manifest["selection"] == "target"
    assert sparse_cache.manifest["tail_rule"] == "mass-matched"
    # the mass-matched shift makes the cached target's tail mass equal the exact one
    ids = torch.tensor(example.targets.ids)
    kept = torch.zeros_like(target, dtype=torch.bool).scatter(1, ids, True)
    exact_tail_mass = target.exp().masked_fill(kept, 0).sum(1)
    shift = torch.tensor(example.targets.target_tail_shift)
    logits_k = student.gather(1, ids) + (tuned - base).gather(1, ids)
    tail_logit = torch.log(torch.tensor(example.targets.student_tail)) + shift
    cached = torch.log_softmax(torch.cat([logits_k, tail_logit[:, None]], 1), dim=1)
    np.testing.assert_allclose(cached[:, -1].exp(), exact_tail_mass, atol=1e-3)


def test_full_vocabulary_cache_is_exact(tiny, exact_cache):
    assert exact_cache.top_k == tiny.vocab_size
    for example in list(all_examples(exact_cache))[:4]:
        positions = torch.tensor(example.target_positions)
        ids = torch.tensor(example.targets.ids)
        assert (ids == torch.arange(tiny.vocab_size)).all()  # every id, sorted
        for model_dir, stored, tail in (
            (tiny.teacher_tuned, example.targets.tuned_logprobs, example.targets.tuned_tail),
            (tiny.teacher_base, example.targets.base_logprobs, example.targets.base_tail),
            (tiny.student, example.targets.student_logprobs, example.targets.student_tail),
        ):
            full = reference_logprobs(model_dir, example.input_ids)[positions]
            np.testing.assert_allclose(stored, full.numpy(), atol=2e-5, rtol=1e-5)
            assert (tail == 0).all()


def test_teacher_only_cache_keeps_the_tuned_top_k(tiny, tmp_path):
    out = tmp_path / "teacher-only"
    result = run_cli(cache_args(tiny, out, "--top-k", 4, student=False))
    assert result.exit_code == 0, result.output
    reader = CacheReader(str(out))
    assert not reader.has_student and reader.manifest["selection"] == "tuned"
    assert "student" not in reader.manifest["provenance"]
    example = next(all_examples(reader))
    assert example.targets.student_logprobs is None and example.targets.target_tail_shift is None
    tuned = reference_logprobs(tiny.teacher_tuned, example.input_ids)
    top = tuned[torch.tensor(example.target_positions)].topk(4).indices.sort(-1).values
    assert (torch.tensor(example.targets.ids) == top).all()


def test_manifest_records_provenance(tiny, sparse_cache):
    manifest = sparse_cache.manifest
    provenance = manifest["provenance"]
    tokenizer = models.load_tokenizer(str(tiny.student))
    assert provenance["student"]["weights_sha256"] == models.weights_fingerprint(str(tiny.student))
    assert provenance["teacher_base"]["tokenizer_sha256"] == models.tokenizer_fingerprint(tokenizer)
    assert provenance["data"]["sha256"] == sources.file_sha256(tiny.train)
    assert manifest["alpha"] == 1.0 and manifest["has_student"]
    assert manifest["bytes_per_response_token"] > 0
    assert sparse_cache.verify() == []


def test_grid_cache_stores_the_exact_family_tail_per_grid_point(tiny, tmp_path):
    out = tmp_path / "grid"
    args = cache_args(tiny, out, "--top-k", 6, "--precision", "float32",
                      "--gammas", "0,0.5,1", "--alphas", "1,2")  # fmt: skip
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    reader = CacheReader(str(out))
    reader.check_structure()
    assert reader.verify() == []
    manifest = reader.manifest
    points = [[0.0, 1.0], [0.0, 2.0], [0.5, 1.0], [0.5, 2.0], [1.0, 1.0], [1.0, 2.0]]
    assert manifest["format_version"] == 6 and manifest["selection"] == "grid"
    assert manifest["grid"]["points"] == points
    assert manifest["grid"]["field"] == "family_tail_logmass"
    assert manifest["grid"]["bytes_per_response_token"] == 6 * 4  # float32, six points
    assert manifest["grid"]["stored_bytes_per_response_token"] > 0
    assert manifest["dtypes"]["family_tail_logmass"] == "float32"
    inspected = run_cli(["inspect", out, "--json", "--verify"])
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.output)["grid"] == manifest["grid"]
    shown = run_cli(["inspect", out, "--json", "--example", 0])
    first = json.loads(shown.output)["positions"][0]
    assert len(first["family_tail_logmass"]) == len(points)
    for example in list(all_examples(reader))[:3]:
        at = torch.tensor(example.target_positions)
        tuned, base, student = (
            reference_logprobs(model, example.input_ids)[at].double()
            for model in (tiny.teacher_tuned, tiny.teacher_base, tiny.student)
        )
        families = [(1 - g) * tuned + g * (student + a * (tuned - base)) for g, a in points]
        # kept ids: top-k of the max over grid points of the normalised family target
        key = torch.stack([f.log_softmax(-1) for f in families]).amax(0)
        top = key.topk(6).indices.sort(-1).values
        ids = torch.tensor(example.targets.ids)
        assert (ids == top).all()
        outside = torch.ones_like(tuned, dtype=torch.bool).scatter(1, ids, False)
        for column, family in enumerate(families):
            expected = family.masked_fill(~outside, float("-inf")).logsumexp(-1)
            stored = torch.tensor(example.targets.family_tail_logmass[:, column]).double()
            torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-4)


def test_a_format_3_cache_without_a_grid_is_still_read(sparse_cache, tmp_path):
    old = tmp_path / "format-3"
    shutil.copytree(sparse_cache.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 3
    manifest["k"] = manifest.pop("top_k")  # formats 3 to 5 named it k
    manifest["settings"] = {"top_k": manifest["k"]}  # and repeated settings.json
    del manifest["grid"], manifest["manifest_sha256"]
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    (old / "manifest.json").write_text(json.dumps(manifest))
    reader = CacheReader(str(old))
    reader.check_structure()
    assert reader.grid_points == () and reader.top_k == sparse_cache.top_k
    example = next(all_examples(reader))
    assert example.targets.family_tail_logmass is None and example.targets.student_tail is not None


def test_one_model_named_twice_is_loaded_and_run_once(tiny, tmp_path, monkeypatch):
    """init-student's healing cache names the source as both teachers: it must be loaded once
    and store exactly what two separate copies of the model store."""
    copy = tmp_path / "base-copy"
    shutil.copytree(tiny.teacher_base, copy)
    twice, copied = tmp_path / "twice", tmp_path / "copied"
    common = ["--top-k", 4, "--teacher-base", tiny.teacher_base]
    result = run_cli(cache_args(tiny, copied, *common, "--teacher-tuned", copy, student=False))
    assert result.exit_code == 0, result.output

    loads = []
    real_load = models.load_model
    monkeypatch.setattr(
        models, "load_model", lambda spec, *a: loads.append(spec) or real_load(spec, *a)
    )
    args = cache_args(tiny, twice, *common, "--teacher-tuned", tiny.teacher_base, student=False)
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert loads == [str(tiny.teacher_base)]
    assert "teacher_tuned is teacher_base: run once" in flat(result.output)

    for once, separate in zip(
        all_examples(CacheReader(str(twice))), all_examples(CacheReader(str(copied))), strict=True
    ):
        assert once.example_index == separate.example_index
        assert np.array_equal(once.targets.ids, separate.targets.ids)
        assert np.array_equal(once.targets.tuned_logprobs, once.targets.base_logprobs)  # Delta = 0
        assert np.allclose(once.targets.tuned_logprobs, separate.targets.tuned_logprobs, atol=1e-6)
        assert np.allclose(once.targets.base_tail, separate.targets.base_tail, atol=1e-6)


def test_conversations_and_text_rows_keep_their_target_masks(tiny, tmp_path):
    """Every assistant turn of a conversation is a target in the cache (none of the user's
    tokens), and distill and finetune train on the same rows."""
    rows = [
        {"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "quick fox"},
            {"role": "assistant", "content": "brown dog"},
            {"role": "user", "content": "lazy river"},
            {"role": "assistant", "content": "night star day"},
        ]},
        {"messages": [
            {"role": "user", "content": "sun moon"},
            {"role": "assistant", "content": "star cloud rain"},
        ]},
    ] * 4  # fmt: skip
    chats = write_jsonl(tmp_path / "chats.jsonl", rows)
    out = tmp_path / "chat-cache"
    result = run_cli(cache_args(tiny, out, "--top-k", 8, "--template", "chat", "--data", chats))
    assert result.exit_code == 0, result.output
    tokenizer = models.load_tokenizer(str(tiny.teacher_tuned))
    examples = data.load_examples(chats, train_turns="all")
    expected = data.tokenize_all(examples, "chat", tokenizer, 256, "all")
    reader = CacheReader(str(out))
    for example in all_examples(reader):
        reference = expected[example.example_index]
        assert example.target_mask.tolist() == reference.target_mask
        assert len(example.targets.ids) == reference.num_targets
        said = tokenizer.decode(example.input_ids[example.target_mask])
        assert "fox" not in said and "river" not in said and "brief" not in said
    result = run_cli(["distill", "--cache", out, "--student", tiny.student, "--out",
                      tmp_path / "student", "--max-steps", 2, "--batch-size", 4,
                      "--num-workers", 0, "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "the quick brown fox jumps"}] * 8)
    result = run_cli(["finetune", "--model", tiny.student, "--data", texts, "--out",
                      tmp_path / "lm", "--max-steps", 2, "--batch-size", 4,
                      "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "lm" / "run.json").read_text())
    assert record["final_metrics"]["target_tokens"] > 0


def test_model_loading_options(tiny, tmp_path):
    result = run_cli(cache_args(tiny, tmp_path / "eager", "--top-k", 4,
                                "--attn-implementation", "eager"))  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "eager" / "manifest.json").read_text())
    assert manifest["options"]["attn_implementation"] == "eager"
    settings = json.loads((tmp_path / "eager" / "settings.json").read_text())["settings"]
    assert settings["attn_implementation"] == "eager"
    assert manifest["provenance"]["teacher_base"]["trust_remote_code"] is False
    result = run_cli(cache_args(tiny, tmp_path / "flash", "--top-k", 4,
                                "--attn-implementation", "flash_attention_2"))  # fmt: skip
    assert_one_line_error(result, "flash_attention_2")
    result = run_cli(cache_args(tiny, tmp_path / "x", "--attn-implementation", "fast"))
    assert_one_line_error(result, "unknown --attn-implementation 'fast'")
