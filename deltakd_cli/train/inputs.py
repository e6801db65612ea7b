"""What a training run trains on: the teachers' cache (distill) or tokenised rows (finetune),
checked against the student and the objective, with the fingerprint a resume compares and the
provenance the run record keeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltakd_cli import data, models
from deltakd_cli.cache.store import CacheReader
from deltakd_cli.errors import DeltakdError
from deltakd_cli.losses import OBJECTIVES
from deltakd_cli.train import batching
from deltakd_cli.train.options import DistillOptions, FinetuneOptions


@dataclass
class TrainingData:
    """What to train on: a store of examples plus what run.json says about where it came from."""

    store: batching.ExampleStore
    provenance: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)  # what a resume must find unchanged
    cache_alpha: float | None = None
    use_cached_student: bool = False  # read and use the cache's S0 log-probs
    needs_frozen_student: bool = False  # run a frozen copy of the initial student


def finetune_data(options: FinetuneOptions, tokenizer: Any) -> TrainingData:
    """JSONL rows -> tokenised examples in memory, grouped by length like a cache shard."""
    path, template, max_length = options.data, options.template, options.max_length
    examples = data.load_examples(path)
    tokenized = data.tokenize_all(examples, template, tokenizer, max_length)
    data_sha = data.file_sha256(path)
    return TrainingData(
        store=batching.TokenizedStore(tokenized),
        source={
            "data": str(path),
            "data_sha256": data_sha,
            "template": template,
            "max_length": max_length,
        },
        provenance={
            "data": {"path": str(Path(path).resolve()), "sha256": data_sha},
            "template": template,
            "max_length": max_length,
            "examples": len(tokenized),
            "truncated": sum(t.truncated for t in tokenized),
        },
    )


def distill_data(options: DistillOptions, tokenizer: Any) -> TrainingData:
    """Open and check a cache against the student and the objective."""
    cache_path, student = options.cache, options.student
    reader = CacheReader(cache_path)
    reader.check_structure()
    if options.verify_cache:
        damaged = reader.verify()
        if damaged:
            raise DeltakdError(
                f"cache {cache_path} fails verification (shards changed since they were written: "
                f"{', '.join(damaged)}); rebuild it with cache-teachers"
            )
    manifest = reader.manifest
    provenance = manifest.get("provenance", {})
    teacher = provenance.get("teacher_tuned") or {}
    cache_tokenizer = teacher.get("tokenizer_sha256")
    if cache_tokenizer != models.tokenizer_fingerprint(tokenizer):
        raise DeltakdError(
            f"tokenizer mismatch: the student {student} does not share the tokenizer the cache "
            f"{cache_path} was built with (teacher {teacher.get('spec', '?')}); the student must "
            "use the teachers' vocabulary"
        )
    if int(manifest["vocab_size"]) != models.tokenizer_vocab_size(tokenizer):
        raise DeltakdError(
            f"vocabulary mismatch: the cache has {manifest['vocab_size']} tokens, the student's "
            f"tokenizer {models.tokenizer_vocab_size(tokenizer)}"
        )
    objective = OBJECTIVES[options.objective]
    use_cached_student = (
        objective.needs_student and reader.has_student and not options.frozen_student
    )
    if use_cached_student:
        cached_student = provenance.get("student") or {}
        if cached_student.get("weights_sha256") != models.weights_fingerprint(student):
            raise DeltakdError(
                f"the cache holds the log-probs of another student ({cached_student.get('spec')}), "
                f"not of {student}: rebuild the cache with --student {student}, or pass "
                "--frozen-student to run a frozen copy of the student instead"
            )
    needs_frozen = objective.needs_student and not use_cached_student
    alpha = manifest.get("alpha")
    local = Path(cache_path).exists()
    return TrainingData(
        store=reader,
        source={"cache": str(cache_path), "manifest_sha256": manifest["manifest_sha256"]},
        provenance={
            "cache": {
                "path": str(Path(cache_path).resolve()) if local else cache_path,
                "format_version": manifest.get("format_version"),
                "k": manifest.get("k"),
                "selection": manifest.get("selection"),
                "tail_rule": manifest.get("tail_rule"),
                "alpha": alpha,
                "has_student": manifest.get("has_student"),
                "precision": manifest.get("precision"),
                "counts": manifest.get("counts"),
                "manifest_sha256": manifest["manifest_sha256"],
            },
            "cache_provenance": provenance,
        },
        cache_alpha=None if alpha is None else float(alpha),
        use_cached_student=use_cached_student,
        needs_frozen_student=needs_frozen,
    )
