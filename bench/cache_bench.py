"""cache-teachers benchmarks: throughput against a bare forward pass, and bytes per token.

    python bench/cache_bench.py   (or `make bench`)

Both teachers are SmolLM2-135M-Instruct (the base, and a perturbed copy standing in for a tuned
teacher: same shapes, same costs), on real abstract2title rows. Ratios are taken inside one run."""

from __future__ import annotations

import shutil
import time

import torch
from common import WORKDIR, abstract2title_rows, perturbed_copy, record, smollm2_dir

from deltakd_cli import data, models
from deltakd_cli.cache import schema
from deltakd_cli.cache.build import PositionLogprobs, cache_teachers, pad_batch, plan_batches
from deltakd_cli.cache.options import CacheOptions

ROWS, MAX_LENGTH, BATCH = 48, 256, 8
GRID_GAMMAS = (0.0, 0.5, 1.0)


def bare_forward_tokens_per_second(base, tuned, tokenized, pad_id, heads_at_targets=False) -> float:
    """Response tokens/s of a plain batched forward of both teachers, nothing stored.

    heads_at_targets=False: the models' own forward (logits at every position).
    heads_at_targets=True: the decoder, then the output head and log_softmax at the response
    positions only: the least any cache must compute, so the ratio to it is the pure overhead of
    choosing ids, tail masses and the store."""
    batches = plan_batches([len(t.input_ids) for t in tokenized], 0, 1, BATCH)
    vocab = base.config.vocab_size
    paths = [PositionLogprobs(model, vocab) for model in (base, tuned)]
    started, targets = time.perf_counter(), 0
    with torch.inference_mode():
        for batch in batches:
            items = [tokenized[i] for i in batch]
            input_ids, mask, rows, positions = pad_batch(items, pad_id, torch.device("cpu"))
            for model, path in zip((base, tuned), paths, strict=True):
                if heads_at_targets:
                    path.logprobs(path.hidden(input_ids, mask)[rows, positions])
                else:
                    model(input_ids=input_ids, attention_mask=mask)
            targets += len(rows)
    return targets / (time.perf_counter() - started)


def cache_run(base, tuned, rows, k, student=None, gammas=None) -> dict:
    grid = "-grid" if gammas else ""
    out = WORKDIR / f"cache-k{k}-{'student' if student else 'teachers'}{grid}"
    shutil.rmtree(out, ignore_errors=True)
    return cache_teachers(
        CacheOptions(
            teacher_base=str(base), teacher_tuned=str(tuned),
            student=str(student) if student else None,
            data=str(rows), out=str(out), top_k=k, max_length=MAX_LENGTH, batch_size=BATCH,
            device="cpu", dtype="float32", gammas=gammas, alphas=(1.0,) if gammas else None,
        )
    )  # fmt: skip


def grid_cost(base_dir, tuned_dir, rows, plain: dict) -> None:
    """What a KD-to-Delta grid (--gammas 0,0.5,1 --alphas 1) adds to `plain`, the manifest of
    the same k = 64 cache with the student: stored bytes per response token, the whole cache and
    the family tails alone."""
    grid = cache_run(base_dir, tuned_dir, rows, 64, base_dir, gammas=GRID_GAMMAS)
    tails = grid["grid"]["stored_bytes_per_response_token"]
    figures = {
        "bytes_per_token_k64_student_grid3": grid["bytes_per_response_token"],
        "bytes_per_token_k64_student_grid3_extra": grid["bytes_per_response_token"]
        - plain["bytes_per_response_token"],
        "bytes_per_token_k64_student_grid3_family_tails": tails,
    }
    settings = {
        "rows": ROWS, "max_length": MAX_LENGTH, "k": 64,
        "gammas": list(GRID_GAMMAS), "alphas": [1.0],
        "models": "SmolLM2-135M-Instruct base + perturbed copy (teachers); base as student",
        "precision": grid.get("precision"),
    }  # fmt: skip
    record("cache_grid", figures, settings)
    for name, value in figures.items():
        print(f"{name:55s} {value:12.3f}")


def main() -> None:
    base_dir = smollm2_dir()
    tuned_dir = perturbed_copy(base_dir, "smollm2-perturbed", scale=0.02)
    rows = abstract2title_rows(ROWS)
    tokenizer = models.load_tokenizer(str(base_dir))
    tokenized = data.tokenize_all(data.load_examples(rows), "alpaca", tokenizer, MAX_LENGTH)
    base = models.load_model(str(base_dir), torch.float32, torch.device("cpu"))
    tuned = models.load_model(str(tuned_dir), torch.float32, torch.device("cpu"))

    pad = tokenizer.pad_token_id
    # Baselines before and after the cache run, averaged, so drift on a shared machine cancels.
    forward = [bare_forward_tokens_per_second(base, tuned, tokenized, pad)]
    minimal = [bare_forward_tokens_per_second(base, tuned, tokenized, pad, heads_at_targets=True)]
    teachers_only = cache_run(base_dir, tuned_dir, rows, 64)
    minimal.append(bare_forward_tokens_per_second(base, tuned, tokenized, pad, True))
    forward.append(bare_forward_tokens_per_second(base, tuned, tokenized, pad))
    forward_rate, minimal_rate = sum(forward) / 2, sum(minimal) / 2
    cached = teachers_only["timing"]["response_tokens_per_second"]

    figures = {
        "cache_vs_forward": cached / forward_rate,
        "cache_vs_forward_heads_at_targets": cached / minimal_rate,
    }
    vocab = teachers_only["vocab_size"]
    dense = vocab * 2  # one float16 distribution over the vocabulary
    settings = {
        "rows": ROWS, "max_length": MAX_LENGTH, "batch_size": BATCH, "dtype": "float32",
        "models": "SmolLM2-135M-Instruct base + perturbed copy (teachers); base as student",
        "forward_tokens_per_second": forward_rate, "cache_tokens_per_second": cached,
        "forward_heads_at_targets_tokens_per_second": minimal_rate,
        "response_tokens": teachers_only["counts"]["response_tokens"],
        "dense_float16_bytes_per_distribution": dense,
    }  # fmt: skip
    manifests = {(64, "teachers"): teachers_only}
    for k in (32, 64):
        for label, student in (("teachers", None), ("student", base_dir)):
            if (k, label) not in manifests:
                manifests[k, label] = cache_run(base_dir, tuned_dir, rows, k, student)
            manifest = manifests[k, label]
            distributions = 3 if student else 2
            per_token = manifest["bytes_per_response_token"]
            figures[f"bytes_per_token_k{k}_{label}"] = per_token
            figures[f"bytes_per_token_k{k}_{label}_per_distribution"] = per_token / distributions
            # The kept ids and distributions alone (prompt tokens and offsets excluded): the
            # figure comparable to offline-KD stores that keep no token ids of their own.
            by_array = manifest["bytes_per_response_token_by_array"]
            entries = sum(v for name, v in by_array.items() if name in schema.PER_POSITION_FIELDS)
            figures[f"bytes_per_token_k{k}_{label}_entries_per_distribution"] = (
                entries / distributions
            )
    figures["bytes_per_token_dense_float16_per_distribution"] = dense
    record("cache", figures, settings)
    for name, value in figures.items():
        print(f"{name:55s} {value:12.3f}")
    grid_cost(base_dir, tuned_dir, rows, manifests[64, "student"])


if __name__ == "__main__":
    main()
