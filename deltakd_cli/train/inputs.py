"""What a training run trains on: the teachers' cache (distill) or tokenised rows (finetune),
checked against the student and the objective, with the fingerprint a resume compares and the
provenance the run record keeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltakd_cli import data, models, sources, vocab
from deltakd_cli.cache.reader import CacheReader
from deltakd_cli.console import info
from deltakd_cli.errors import DeltakdError
from deltakd_cli.method import objectives
from deltakd_cli.method.spec import CacheFacts, Tail, tail_estimator
from deltakd_cli.method.targets import SAMPLE_FIELDS, grid_column
from deltakd_cli.method.view import build_view
from deltakd_cli.train import batching
from deltakd_cli.train.options import DistillOptions, FinetuneOptions


@dataclass
class TrainingData:
    """What to train on: a store of examples plus what run.json says about where it came from."""

    store: batching.ExampleStore
    provenance: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)  # what a resume must find unchanged
    vocab_size: int = 0  # the working vocabulary: the student's logits are cut to it
    # The cache's alpha, (gamma, alpha) grid (in the order of its family_tail_logmass columns)
    # and the temperature its distributions are stored at.
    facts: CacheFacts = field(default_factory=CacheFacts)
    use_cached_student: bool = False  # read and use the cache's S0 log-probs
    # Use the cache's mass-matched tail shift: it was computed with the cache's own base student,
    # so it holds only for that student (with another one the teacher tail rule is used).
    use_cached_tail_shift: bool = True
    needs_frozen_student: bool = False  # run a frozen copy of the initial student
    tail: Tail | None = None  # how the tail outside K is trained (None: no cache, finetune)
    tail_is_default: bool = False  # the objective's default, not --tail
    template: dict[str, Any] | None = None  # how prompts were rendered (the cache's record)
    eval_store: batching.ExampleStore | None = None  # --eval-data: the held-out examples


def with_eval_data(training: TrainingData, held_out: TrainingData, eval_data: str) -> TrainingData:
    """`training` with the held-out examples of `held_out` (read from --eval-data), which must
    give the same target: same vocabulary, same cached-student use, same alpha."""
    pairs = (
        ("vocabulary size", training.vocab_size, held_out.vocab_size),
        ("cached base-student log-probs", training.use_cached_student, held_out.use_cached_student),
        ("alpha", training.facts.alpha, held_out.facts.alpha),
        ("(gamma, alpha) grid", training.facts.grid, held_out.facts.grid),
        ("use of its tail shift", training.use_cached_tail_shift, held_out.use_cached_tail_shift),
        ("tail", training.tail, held_out.tail),
        ("temperature", training.facts.temperature, held_out.facts.temperature),
    )
    for what, trained, held in pairs:
        if trained != held:
            raise DeltakdError(
                f"--eval-data {eval_data} does not match the training data: its {what} is {held}, "
                f"the training data's {trained} (build it the same way, on the held-out rows)"
            )
    training.eval_store = held_out.store
    training.provenance["eval_data"] = {
        key: held_out.provenance[key] for key in ("cache", "data") if key in held_out.provenance
    }
    return training


def finetune_data(options: FinetuneOptions, tokenizer: Any) -> TrainingData:
    """Rows -> tokenised examples in memory, grouped by length like a cache shard."""
    template, max_length = options.template, options.max_length
    source = options.data_source(options.data)
    examples = data.load_examples(
        source, columns=data.columns_of(options), train_turns=options.train_turns
    )
    tokenized = data.tokenize_all(examples, template, tokenizer, max_length, options.train_turns)
    fingerprint = sources.fingerprint(source)
    return TrainingData(
        store=batching.TokenizedStore(tokenized),
        source={
            "data": str(options.data),
            "data_sha256": fingerprint["sha256"],
            "template": template,
            "max_length": max_length,
            "train_turns": options.train_turns,
        },
        provenance={
            "data": {**fingerprint, "spec": options.data},
            "template": template,
            "max_length": max_length,
            "train_turns": options.train_turns,
            "examples": len(tokenized),
            "truncated": sum(t.truncated for t in tokenized),
        },
        vocab_size=models.tokenizer_vocab_size(tokenizer),
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
    record = reader.record
    provenance = record.provenance
    compatibility = vocab.compare_with_tokens(
        reader.vocabulary(), tokenizer, f"the cache {cache_path}", f"the student {student}"
    )
    template = provenance.get("template") or {}
    if isinstance(template, dict) and template.get("eos_token"):
        roles = vocab.roles_of(tokenizer)
        if roles["eos"] != template["eos_token"]:
            compatibility.notes.append(
                f"the cache's responses end with {template['eos_token']} (its template "
                f"tokenizer's EOS); the student's own EOS is {roles['eos']}: the exported "
                "student ends on the cache's"
            )
    for note in compatibility.notes:
        info(f"[yellow]note:[/yellow] {note}")
    objective = objectives.get(options.objective)
    use_cached_student = (
        objective.needs_student and reader.has_student and not options.frozen_student
    )
    if use_cached_student:
        cached_student = provenance.get("student") or {}
        if cached_student.get("weights_sha256") != models.weights_fingerprint(student):
            raise DeltakdError(
                f"the cache holds the log-probs of the student {cached_student.get('spec')} "
                f"(weights sha256 {str(cached_student.get('weights_sha256'))[:12]}), but the "
                f"weights of {student} differ: another student, or the same one changed or "
                f"damaged since; rebuild the cache with --student {student}, or pass "
                "--frozen-student to run a frozen copy of the student instead"
            )
    needs_frozen = objective.needs_student and not use_cached_student
    use_cached_tail_shift = True
    if needs_frozen and reader.has_student:
        cached_student = provenance.get("student") or {}
        if cached_student.get("weights_sha256") != models.weights_fingerprint(student):
            use_cached_tail_shift = False
            if record.tail_rule == "mass-matched":
                info(
                    "[yellow]note:[/yellow] the cache's mass-matched tail was computed for its "
                    f"own base student ({cached_student.get('spec')}), not {student}: the "
                    "teacher tail rule is used instead (docs/method.md)"
                )
    tail, tail_is_default = resolve_tail(options, reader)
    if tail.uses_draws:
        check_draw_temperature(options, reader)
    else:
        reader.skip_fields = SAMPLE_FIELDS  # a tail without draws never reads them
    alpha = record.alpha
    facts = CacheFacts(
        alpha=None if alpha is None else float(alpha),
        grid=reader.grid_points,
        temperature=reader.temperature,
    )
    if objective.needs_cache:
        info(
            f"tail: {tail.label} ("
            + (f"the default for {objective.name}" if tail_is_default else "--tail")
            + "; docs/method.md)"
        )
    if not tail.uses_draws:
        family_tail_note(options, facts.grid, use_cached_tail_shift)
    else:
        self_normalised_note(
            options, reader, tail, facts, use_cached_student, use_cached_tail_shift
        )
    local = Path(cache_path).exists()
    return TrainingData(
        store=reader,
        source={"cache": str(cache_path), "manifest_sha256": record.manifest_sha256},
        provenance={
            "cache": {
                "path": str(Path(cache_path).resolve()) if local else cache_path,
                "format_version": record.format_version,
                "k": record.top_k,
                "selection": record.selection,
                "tail_rule": record.tail_rule,
                "alpha": alpha,
                "grid": record.grid,
                "tail_samples": record.tail_samples,
                "sample_seed": record.sample_seed,
                "proposal": record.proposal,
                "temperature": record.temperature,
                "has_student": record.has_student,
                "precision": record.precision,
                "counts": record.counts,
                "manifest_sha256": record.manifest_sha256,
            },
            "cache_provenance": provenance,
        },
        vocab_size=record.vocab_size,
        facts=facts,
        use_cached_student=use_cached_student,
        needs_frozen_student=needs_frozen,
        use_cached_tail_shift=use_cached_tail_shift,
        tail=tail,
        tail_is_default=tail_is_default,
        template=template if isinstance(template, dict) else None,
    )


def self_normalised_note(
    options: DistillOptions,
    reader: CacheReader,
    tail: Tail,
    facts: CacheFacts,
    with_student: bool,
    with_tail_shift: bool,
) -> None:
    """One note line where the drawn target's normaliser is not known to the cache (another
    alpha, an off-grid gamma, another student): its weights are then self-normalised, biased
    O(1/M); the line gives their mean effective sample size on the cache's first examples (when
    the cache holds the student they need)."""
    objective = objectives.get(options.objective)
    if not objective.needs_cache:
        return
    spec = objective.target(objective.settings_from(options))
    examples = reader.read_examples(0, 0, min(16, len(reader.shard_lengths(0))))
    if not examples:
        return
    cached = batching.collate(examples, 0, with_student, with_tail_shift)["cached"]
    if spec.needs_student and cached.student_logprobs is None:
        size = "the effective sample size needs the live base student and is not shown"
    else:
        view = build_view(cached, spec, tail, facts, facts.temperature)
        if view.ess is None:
            return
        mean = float(view.ess.mean())
        size = f"mean effective sample size {mean:.1f} of {reader.tail_samples} draws"
    gammas = ", ".join(f"{gamma:g}" for _, gamma in spec.points)
    info(
        f"[yellow]note:[/yellow] the cache does not know the normaliser of this target (gamma "
        f"{gammas}, alpha {spec.alpha:g}): the drawn tail's weights are self-normalised, "
        f"biased O(1/M) (docs/method.md); {size} on its first examples"
    )


def resolve_tail(options: DistillOptions, reader: CacheReader) -> tuple[Tail, bool]:
    """The tail estimator of the run and whether it is the objective's default: --tail, else
    the objective's measured default when the cache has draws, else the bucket."""
    objective = objectives.get(options.objective)
    if options.tail is None:
        name = objective.default_tail if reader.tail_samples else "bucket"
        is_default = True
    else:
        name, is_default = options.tail, False
    if name != "bucket" and not reader.tail_samples:
        raise DeltakdError(
            f"--tail {name} needs a cache with drawn tail ids; {options.cache} has none "
            "(rebuild it with cache-teachers --tail-samples M, or use --tail bucket)"
        )
    if name != "corrected" and options.tail_beta != 1.0:
        raise DeltakdError(
            f"--tail-beta is read by the corrected tail only; this run's tail is {name}"
        )
    if name == "bucket" and reader.temperature != 1.0:
        raise DeltakdError(
            f"cache drawn at temperature {reader.temperature:g} serves only its drawn tails; "
            "use --tail sampled or corrected, or rebuild the cache at temperature 1"
        )
    return tail_estimator(name, options.tail_beta), is_default


def check_draw_temperature(options: DistillOptions, reader: CacheReader) -> None:
    """The draws, masses and shifts were computed at the cache's temperature: train at it."""
    temperature = reader.temperature
    if objectives.get(options.objective).needs_cache and options.temperature != temperature:
        raise DeltakdError(
            f"cache drawn at temperature {temperature:g}; use --temperature {temperature:g} or "
            "rebuild the cache at the temperature you want"
        )


def family_tail_note(
    options: DistillOptions, cache_grid: tuple[tuple[float, float], ...], usable: bool
) -> None:
    """One note line when a bucket target's family point (0 < gamma < 1) cannot use the cache's
    exact family tail."""
    objective = objectives.get(options.objective)
    if not objective.needs_cache:
        return
    spec = objective.target(objective.settings_from(options))
    for _, gamma in spec.points:
        if gamma in (0.0, 1.0):
            continue
        point = f"(gamma {gamma:g}, alpha {spec.alpha:g})"
        if grid_column(cache_grid, gamma, spec.alpha) is None:
            points = ", ".join(f"({g:g}, {a:g})" for g, a in cache_grid) or "none"
            reason = f"{point} is not a grid point of the cache (its grid: {points})"
        elif not usable:
            reason = f"the cache's exact tail at {point} was computed for its own base student"
        else:
            continue
        info(
            f"[yellow]note:[/yellow] {reason}: the tail bucket of {objective.name} uses the "
            "fallback (1 - gamma) log mT + gamma (log m0 + shift), an upper bound, exact at "
            "gamma 0 and 1 (docs/method.md)"
        )
