"""The cache-teachers workflow: run the base and tuned teacher (and optionally the base student)
once over the data, choose the kept ids per response position, and write the cache.

Read top to bottom: options -> checks -> plan -> the batch loop -> manifest."""

from __future__ import annotations

import json
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltakd_cli import (
    __version__,
    data,
    distributed,
    memory,
    models,
    outputs,
    sources,
    vocab,
)
from deltakd_cli.cache import schema
from deltakd_cli.cache.location import VOCABULARY_FILE, Location
from deltakd_cli.cache.manifest import (
    CacheRecord,
    prepare_output,
    read_manifest,
    shard_checksums,
    write_manifest,
)
from deltakd_cli.cache.options import CacheOptions
from deltakd_cli.cache.progress import COUNTS
from deltakd_cli.cache.reader import CacheReader
from deltakd_cli.cache.writer import ShardWriter
from deltakd_cli.console import info, progress
from deltakd_cli.distributed import on_main_first
from deltakd_cli.errors import DeltakdError, Interrupted
from deltakd_cli.method import targets
from deltakd_cli.method.targets import (
    RULES_NEEDING_GRID,
    RULES_NEEDING_STUDENT,
    TAIL_RULES_NEEDING_STUDENT,
)
from deltakd_cli.options import PATHS_ARE, absolute_paths, check
from deltakd_cli.options import record as options_record

POSITIONS_PER_PASS = 1024  # positions whose full-vocabulary log-probs are held at once (not
# the zarr chunk, schema.ZARR_POSITION_CHUNK)
CHECK_POSITIONS = 64  # leading positions of one row on which the logits path is checked


def validate(options: CacheOptions) -> None:
    """Checks that need no model: numbers, choices, paths. Fails before anything is loaded."""
    check(options)
    grid = options.grid()  # bad --gammas / --alphas fail here
    if grid and not options.student:
        raise DeltakdError(
            "--gammas/--alphas need --student: the KD-to-Delta family is built on the base "
            "student's log-probs"
        )
    selection, tail_rule = options.resolved_selection(), options.resolved_tail_rule()
    if selection in RULES_NEEDING_GRID and not grid:
        raise DeltakdError(f"--selection {selection} needs a grid: give --gammas (and --alphas)")
    needs_student = selection in RULES_NEEDING_STUDENT or tail_rule in TAIL_RULES_NEEDING_STUDENT
    if needs_student and not options.student:
        raise DeltakdError(
            f"--selection {selection} / --tail-rule {tail_rule} need --student (the base student)"
        )
    if options.device_map and distributed.launched_by_torchrun():
        raise DeltakdError(
            "--device-map splits one model over this host's GPUs; not under torchrun"
        )
    if options.temperature != 1.0 and options.tail_samples == 0:
        raise DeltakdError(
            "--temperature needs the sampled tail (--tail-samples > 0): a tail bucket cache is "
            "stored at temperature 1, and distill tempers it"
        )
    if options.template_from == "student" and not options.student:
        raise DeltakdError("--template-from student needs --student")
    options.load_settings().check(distributed.device_for(options.device))
    for spec in filter(None, (options.teacher_base, options.teacher_tuned, options.student)):
        models.resolve_source(spec)  # a missing local path fails here, before any loading
    outputs.check_not_input(
        options.out,
        {
            "--teacher-base": options.teacher_base,
            "--teacher-tuned": options.teacher_tuned,
            "--student": options.student,
            "--data": options.data,
        },
    )


TEMPLATE_ROLE = {"tuned": "teacher_tuned", "base": "teacher_base", "student": "student"}


def template_record(options: CacheOptions, tokenizer: Any, role: str) -> dict[str, Any]:
    """How prompts were rendered and responses ended (the cache's provenance; distill's export
    gives the student the same chat template and EOS, so it stops where the teacher does)."""
    chat_template = getattr(tokenizer, "chat_template", None)
    return {
        "name": options.template,
        "from": role,
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "chat_template": chat_template if options.template == "chat" else None,
        "train_turns": options.train_turns,
    }


def check_ids_shared(
    tokenized: list[data.TokenizedExample], examples: list[data.Example], tokenizer: Any, size: int
) -> None:
    """Every token id of the data must be one all models share (a token only the template's
    tokenizer has would index past another model's embeddings)."""
    for example, item in zip(examples, tokenized, strict=True):
        outside = [token for token in item.input_ids if token >= size]
        if outside:
            name = tokenizer.convert_ids_to_tokens(outside[0])
            raise DeltakdError(
                f"example {example.id}: token id {outside[0]} ({name!r}) is not shared by every "
                f"model (ids up to {size - 1} are); render the prompts with another "
                "--template-from or --template"
            )


# ----------------------------------------------------------------------------- model forward


class PositionLogprobs:
    """Full-vocabulary log-probs of one model at chosen positions, without [B, L, V] logits:
    the decoder runs once, then the output head (`models.head_logits`, the same step training
    uses) runs on the target positions' hidden states."""

    def __init__(self, model: Any, vocab_size: int, temperature: float = 1.0):
        self.model = model
        self.vocab_size = vocab_size
        self.temperature = temperature  # the cache stores softmax(logits / temperature)
        self.decoder = models.decoder_of(model)
        self.checked = False

    @torch.inference_mode()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    @torch.inference_mode()
    def logprobs(self, hidden_at_targets: torch.Tensor) -> torch.Tensor:
        logits = models.head_logits(self.model, hidden_at_targets, self.vocab_size)
        return torch.log_softmax(logits.float() / self.temperature, dim=-1)

    @torch.inference_mode()
    def check_against_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Once: the decoder+head path must equal the model's own forward (catches architectures
        that scale or post-process logits in ways this path does not know)."""
        if self.checked:
            return
        self.checked = True
        # A prefix of the first row is enough (position t sees only tokens <= t) and keeps the
        # check's whole-row [tokens, vocab] logits (the model's forward computes them at every
        # position, in float32 ~4 times over) from being the run's peak: a 2,048-token row at
        # 151,936 ids is 1.16 GiB per copy.
        rows = input_ids[:1, :CHECK_POSITIONS], attention_mask[:1, :CHECK_POSITIONS]
        reference = self.model(input_ids=rows[0], attention_mask=rows[1]).logits[0]
        reference = reference[:, : self.vocab_size].float() / self.temperature
        reference = torch.log_softmax(reference, dim=-1)
        ours = self.logprobs(self.hidden(*rows)[0])
        valid = rows[1][0].bool().to(ours.device)
        weight = self.model.get_output_embeddings().weight
        tolerance = 1e-3 if weight.dtype == torch.float32 else 5e-2
        if not torch.allclose(
            ours[valid], reference.to(ours.device)[valid], atol=tolerance, rtol=0
        ):
            raise DeltakdError(
                f"{type(self.model).__name__}: its logits are post-processed in a way deltakd "
                "does not reproduce; please report this model type"
            )


# ----------------------------------------------------------------------------- plan


def plan_batches(lengths: list[int], rank: int, world: int, batch_size: int) -> list[list[int]]:
    """Longest examples first (so an out-of-memory shows in the first batch), dealt round-robin
    over ranks, then cut into batches of `batch_size` similar lengths."""
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    mine = order[rank::world]
    return [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]


def pad_batch(
    tokenized: list[data.TokenizedExample], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask, and the (row, position) of every target."""
    width = max(len(t.input_ids) for t in tokenized)
    input_ids = torch.full((len(tokenized), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(tokenized), width), dtype=torch.long)
    rows, positions = [], []
    for row, example in enumerate(tokenized):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention_mask[row, : len(example.input_ids)] = 1
        span = data.target_positions(example.target_mask)
        rows.extend([row] * len(span))
        positions.extend(span.tolist())
    return (
        input_ids.to(device),
        attention_mask.to(device),
        torch.tensor(rows, device=device),
        torch.tensor(positions, device=device),
    )


def settings_of(
    options: CacheOptions,
    identities: dict[str, Any],
    data_sha: str,
    world: int,
    vocabulary_sha: str,
) -> dict:
    """Everything that decides the cache's bytes: a resume must match it exactly."""
    return {
        "models": {role: identity["weights_sha256"] for role, identity in identities.items()},
        "data_sha256": data_sha,
        "columns": [
            options.prompt_field,
            options.response_field,
            options.messages_field,
            options.text_field,
            options.context_field,
        ],
        "template_from": options.template_from,
        "train_turns": options.train_turns,
        "vocabulary_sha256": vocabulary_sha,
        "attn_implementation": options.attn_implementation,
        "top_k": options.top_k,
        "selection": options.resolved_selection(),
        "tail_rule": options.resolved_tail_rule(),
        "alpha": options.alpha if options.student else None,
        "grid": [list(point) for point in options.grid()] or None,
        "tail_samples": options.tail_samples,
        "sample_seed": options.sample_seed if options.tail_samples else None,
        "proposal": options.proposal(),
        "temperature": options.temperature,
        "template": options.template,
        "max_length": options.max_length,
        "batch_size": options.batch_size,
        "precision": options.precision,
        "dtype": options.dtype,
        "world_size": world,
        "format_version": schema.FORMAT_VERSION,
    }


# ----------------------------------------------------------------------------- memory


def cache_estimate(
    options: CacheOptions,
    shapes: list[memory.ModelShape],
    length: int,
    device: torch.device,
    batch_size: int | None = None,
    dtype: str | None = None,
) -> memory.Estimate:
    """Per-device memory of the run (or of it with another --batch-size or --dtype)."""
    weight_dtype = models.resolve_dtype(dtype or options.dtype, device)
    return memory.inference_estimate(
        shapes,
        batch_tokens=(batch_size or options.batch_size) * length,
        position_chunk=POSITIONS_PER_PASS,
        weight_bytes=torch.finfo(weight_dtype).bits // 8,
        roles=3 if options.student else 2,
    )


def check_memory(options: CacheOptions, device: torch.device) -> None:
    """Before any weight is loaded: what the models and the largest batch need per device, and a
    one-line refusal, naming what would fit, when that exceeds it. A model named under two roles
    is counted once (it is loaded once); --device-map spreads models over GPUs: not checked."""
    if options.device_map:
        return
    load = options.load_settings()
    specs = {"teacher_base": options.teacher_base, "teacher_tuned": options.teacher_tuned}
    if options.student:
        specs["student"] = options.student
    shapes = [memory.shape_of_model(spec, load) for spec in dict.fromkeys(specs.values())]
    length = models.resolve_max_length(options.max_length, specs, load)

    def changed(**changes: Any) -> memory.Estimate:
        return cache_estimate(options, shapes, length, device, **changes)

    alternatives: list[list[memory.Alternative]] = []
    if models.resolve_dtype(options.dtype, device) == torch.float32:
        alternatives.append([("--dtype bfloat16", changed(dtype="bfloat16"))])
    if options.batch_size > 1:
        smaller = range(options.batch_size - 1, 0, -1)
        alternatives.append([(f"--batch-size {b}", changed(batch_size=b)) for b in smaller])
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus > 1:  # the weights spread over the host's GPUs; a batch's work stays on one
        estimate = changed()
        split = {**estimate.parts, "weights": estimate.parts["weights"] // gpus}
        alternatives.append([(f"--device-map auto over {gpus} GPUs", memory.Estimate(split))])
    on_device = distributed.local_world_size() if device.type == "cpu" else 1
    memory.check_fits("cache-teachers", changed(), device, alternatives, on_device)


# ----------------------------------------------------------------------------- the workflow


def cache_teachers(options: CacheOptions) -> dict[str, Any]:
    """Run the whole stage; returns the manifest (rank 0) or this rank's counts."""
    validate(options)
    device = distributed.device_for(options.device)
    models.check_device(device)
    check_memory(options, device)
    distributed.init(device, options.resolved_dist_timeout())
    lock = None
    if distributed.is_main_process() and not outputs.is_url(options.out):
        lock = outputs.directory_lock(outputs.local_path(options.out), f"cache {options.out}")
    try:
        return _cache_teachers(options, device, lock)
    except KeyboardInterrupt:
        raise Interrupted(
            "cache-teachers stopped; rerun the same command to resume (the batches already "
            "written are kept)"
        ) from None
    finally:
        if lock is not None:
            lock.release()


def _cache_teachers(
    options: CacheOptions, device: torch.device, lock: outputs.OutputLock | None
) -> dict[str, Any]:
    rank, world = distributed.rank(), distributed.world_size()
    location = Location(options.out)

    roles = {"teacher_base": options.teacher_base, "teacher_tuned": options.teacher_tuned}
    if options.student:
        roles["student"] = options.student
    load = options.load_settings()
    tokenizers = {role: models.load_tokenizer(spec, load) for role, spec in roles.items()}
    template_role = TEMPLATE_ROLE[options.template_from]
    tokenizer = tokenizers[template_role]  # renders the prompts and ends the responses
    ordered = {template_role: tokenizer, **tokenizers}
    compatibility = vocab.compare(ordered)
    for note in compatibility.notes:
        info(f"[yellow]note:[/yellow] {note}")
    vocab_size = compatibility.size
    if options.top_k > vocab_size:
        raise DeltakdError(f"--top-k {options.top_k} is larger than the vocabulary ({vocab_size})")
    options = replace(options, tail_samples=options.resolved_tail_samples(vocab_size))
    if options.tail_samples and options.top_k >= vocab_size:
        raise DeltakdError(
            f"--tail-samples {options.tail_samples} needs a tail to draw from, but --top-k "
            f"{options.top_k} keeps the whole vocabulary ({vocab_size} ids); lower --top-k or "
            "drop --tail-samples"
        )
    max_length = models.resolve_max_length(options.max_length, roles, load)
    options = replace(options, max_length=max_length)

    source = options.data_source(options.data)
    examples = data.load_examples(
        source, columns=data.columns_of(options), train_turns=options.train_turns
    )
    tokenized = data.tokenize_all(
        examples, options.template, tokenizer, options.max_length, options.train_turns
    )
    check_ids_shared(tokenized, examples, tokenizer, vocab_size)
    data_sha = sources.fingerprint(source)["sha256"]
    truncated = sum(t.truncated for t in tokenized)
    if truncated:
        info(
            f"[yellow]note:[/yellow] {truncated} of {len(tokenized)} examples are longer than "
            f"--max-length {options.max_length} and were cut (the prompt keeps at least half the "
            "length, the response is cut from its end)"
        )

    # Hash weights once (rank 0) and share: provenance and the resume check both use it.
    identities = None
    if rank == 0:
        identities = {
            role: models.model_identity(spec, tokenizers[role], load)
            for role, spec in roles.items()
        }
    identities = distributed.broadcast_object(identities)
    vocabulary = vocab.tokens_by_id(tokenizer)[:vocab_size]
    vocabulary_sha = vocab.vocabulary_sha256(vocabulary)
    settings = settings_of(options, identities, data_sha, world, vocabulary_sha)
    template = template_record(options, tokenizer, template_role)

    def claim() -> str:
        if not location.url and Path(location.root).exists():
            if not Path(location.root).is_dir():
                raise DeltakdError(f"--out {options.out} exists and is not a directory")
        if lock is not None:
            lock.acquire()
        return prepare_output(location, settings, options.overwrite)

    state = on_main_first(claim)
    if state != "complete" and rank == 0:
        location.write_text(VOCABULARY_FILE, json.dumps(vocabulary, ensure_ascii=False))
    if state == "complete":
        info(f"[green]{options.out} is already complete[/green] for these settings; nothing to do")
        complete = read_manifest(location)
        return complete.to_json() if complete else {}

    dtype = models.resolve_dtype(options.dtype, device)
    loaded: dict[str, PositionLogprobs] = {}
    # A model named under two roles (init-student's healing cache: both teachers are the
    # source) is loaded and run once; `shared` maps the second role to the first.
    shared: dict[str, str] = {}
    for role, spec in roles.items():
        twin = next((r for r in loaded if same_model(identities[r], identities[role])), None)
        if twin is not None:
            shared[role] = twin
            continue
        model = models.load_model(spec, dtype, device, options.device_map, load)
        models.check_model_vocab(model, vocab_size, role)
        loaded[role] = PositionLogprobs(model, vocab_size, options.temperature)
    if shared:
        info(", ".join(f"{role} is {twin}: run once" for role, twin in shared.items()))

    grid = options.grid()
    specs = schema.array_specs(
        options.top_k,
        vocab_size,
        options.precision,
        bool(options.student),
        len(grid),
        options.tail_samples,
    )
    batches = plan_batches([len(t.input_ids) for t in tokenized], rank, world, options.batch_size)
    writer = ShardWriter(location, rank, world, specs, [len(batch) for batch in batches])
    done = writer.committed["batches"]
    if done:
        info(f"resuming: {done} of {len(batches)} batches already in {writer.name}")

    my_targets = sum(tokenized[i].num_targets for batch in batches for i in batch)
    bytes_per_position = schema.position_bytes(specs)
    total_targets = sum(t.num_targets for t in tokenized)
    info(
        f"caching {len(tokenized)} examples ({total_targets} response tokens) at "
        f"k={options.top_k}, "
        f"selection {options.resolved_selection()}, tail {tail_summary(options)}"
        f"{grid_summary(grid)}; "
        f"at most ~{total_targets * bytes_per_position / 2**20:.1f} MiB before compression"
    )
    pad_id = tokenizer.pad_token_id
    started, tokens_done = time.perf_counter(), 0
    with progress("example") as bar:
        task = bar.add_task("cache-teachers", total=sum(len(b) for b in batches), status="")
        bar.update(task, completed=sum(len(b) for b in batches[:done]))
        for batch in batches[done:]:
            items = [tokenized[i] for i in batch]
            input_ids, attention_mask, rows, positions = pad_batch(items, pad_id, device)
            stored = _batch_entries(
                loaded, shared, input_ids, attention_mask, rows, positions, options, batch
            )
            writer.put(
                schema.BatchRecord(
                    example_index=np.array(batch, dtype=np.int64),
                    input_ids=[np.array(t.input_ids) for t in items],
                    target_mask=[np.array(t.target_mask, dtype=np.uint8) for t in items],
                    positions=schema.encode_positions(stored, vocab_size, options.precision),
                )
            )
            tokens_done += len(rows)
            rate = tokens_done / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=len(batch), status=f"{rate:,.0f} tok/s")
    committed = writer.close()
    loop_seconds = time.perf_counter() - started
    if committed["positions"] != my_targets:
        raise DeltakdError(
            f"{writer.name}: wrote {committed['positions']} of {my_targets} positions"
        )

    shard_summary = {"name": writer.name, **{key: committed[key] for key in COUNTS}}
    shard_summary.update(shard_checksums(location, writer.group_path))
    shards = distributed.all_gather_objects(shard_summary, "the end of the shards")
    manifest: dict[str, Any] = {}
    if rank == 0:
        # Rank 0's compute loop, stores included (what `make bench` compares to a bare forward).
        timing = {
            "loop_seconds": loop_seconds,
            "response_tokens_per_second": tokens_done / max(loop_seconds, 1e-9),
            "world_size": world,
        }
        record = build_record(
            options, specs, identities, vocab_size, vocabulary_sha, tokenized, shards, template,
            source,
            compatibility.notes, timing,
        )  # fmt: skip
        # The readers' own structural check first: a cache is complete iff its manifest exists,
        # so nothing they would refuse is ever called complete.
        CacheReader(options.out, record).check_structure()
        write_manifest(location, record)
        elapsed = time.perf_counter() - started
        info(
            f"[green]wrote {options.out}[/green]: {record.counts['examples']} examples, "
            f"{record.counts['response_tokens']} response tokens, "
            f"{record.bytes_per_response_token:.1f} bytes per response token, "
            f"{elapsed:.1f}s"
        )
        manifest = record.to_json()
    distributed.barrier()
    return manifest


GRID_FIELD = "family_tail_logmass"  # the per-position array of the grid's exact tails


def tail_summary(options: CacheOptions) -> str:
    if not options.tail_samples:
        return f"bucket ({options.resolved_tail_rule()})"
    return (
        f"{options.tail_samples} draws from {options.proposal()} (seed {options.sample_seed}; "
        f"bucket rule {options.resolved_tail_rule()})"
    )


def grid_summary(grid: tuple[targets.GridPoint, ...]) -> str:
    if not grid:
        return ""
    return ", (gamma, alpha) grid " + " ".join(f"({g:g},{a:g})" for g, a in grid)


def grid_record(
    grid: tuple[targets.GridPoint, ...],
    precision: str,
    array_bytes: dict[str, int],
    positions: int,
) -> dict[str, Any] | None:
    """The manifest's `grid`: the (gamma, alpha) points in the order of the columns of
    family_tail_logmass, and what they cost per target position (raw: one value of the stored
    precision per point; stored: after compression). None without a grid."""
    if not grid:
        return None
    return {
        "points": [[gamma, alpha] for gamma, alpha in grid],
        "field": GRID_FIELD,
        "bytes_per_response_token": len(grid) * np.dtype(precision).itemsize,
        "stored_bytes_per_response_token": array_bytes.get(GRID_FIELD, 0) / max(positions, 1),
    }


def same_model(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """Two roles name one model: the same location (and GGUF file) with the same weights."""
    keys = ("path", "gguf_file", "weights_sha256")
    return all(first[key] == second[key] for key in keys)


def _batch_entries(
    loaded: dict[str, PositionLogprobs],
    shared: dict[str, str],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
    options: CacheOptions,
    batch: list[int],
) -> targets.CachedTargets:
    """Forward every model once, then build the cached entries chunk by chunk of positions.
    `batch` holds the examples' indices in the data (the tail draws are keyed by them)."""
    hidden = {}
    for role, model in loaded.items():
        model.check_against_forward(input_ids, attention_mask)
        states = model.hidden(input_ids, attention_mask)
        # With --device-map the last layer may sit on another GPU than the inputs.
        hidden[role] = states[rows.to(states.device), positions.to(states.device)]
    chunks = []
    grid = options.grid()
    for start in range(0, len(rows), POSITIONS_PER_PASS):
        at = slice(start, start + POSITIONS_PER_PASS)
        logprobs = {
            role: loaded[role].logprobs(hidden[role][at]).to(input_ids.device) for role in loaded
        }
        logprobs.update({role: logprobs[twin] for role, twin in shared.items()})
        draws = None
        if options.tail_samples:
            draws = targets.TailDraws(
                samples=options.tail_samples,
                seed=options.sample_seed,
                example_index=torch.tensor(batch, dtype=torch.long)[rows[at].cpu()],
                position=positions[at].cpu(),
            )
        chunks.append(
            targets.build_cached_targets(
                logprobs["teacher_tuned"],
                logprobs["teacher_base"],
                logprobs.get("student"),
                options.top_k,
                options.resolved_selection(),
                options.alpha,
                options.resolved_tail_rule(),
                grid,
                draws,
            )
        )
    return _concat_targets(chunks)


def _concat_targets(chunks: list[targets.CachedTargets]) -> targets.CachedTargets:
    if len(chunks) == 1:
        return chunks[0]
    joined = {}
    for field in fields(targets.CachedTargets):
        values = [getattr(chunk, field.name) for chunk in chunks]
        joined[field.name] = None if values[0] is None else torch.cat(values)
    return targets.CachedTargets(**joined)


def build_record(
    options: CacheOptions,
    specs: dict[str, tuple],
    identities: dict[str, Any],
    vocab_size: int,
    vocabulary_sha: str,
    tokenized: list[data.TokenizedExample],
    shards: list[dict[str, Any]],
    template: dict[str, Any],
    source: sources.DataSource,
    tokenizer_notes: list[str],
    timing: dict[str, Any],
) -> CacheRecord:
    """The manifest's record of a finished cache (`specs`: its arrays, as written)."""
    positions = sum(shard["positions"] for shard in shards)
    stored_bytes = sum(shard["bytes"] for shard in shards)
    array_bytes: dict[str, int] = {}
    for shard in shards:
        for name, size in shard["array_bytes"].items():
            array_bytes[name] = array_bytes.get(name, 0) + size
    return CacheRecord(
        format_version=schema.FORMAT_VERSION,
        tool={"name": "deltakd", "version": __version__},
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        vocab_size=vocab_size,
        top_k=options.top_k,
        selection=options.resolved_selection(),
        tail_rule=options.resolved_tail_rule(),
        alpha=options.alpha if options.student else None,
        has_student=bool(options.student),
        grid=grid_record(options.grid(), options.precision, array_bytes, positions),
        # The sampled tail (format 5): draws per position, their seed and proposal; 0 / null
        # without. Every distribution is stored at `temperature`.
        tail_samples=options.tail_samples,
        sample_seed=options.sample_seed if options.tail_samples else None,
        proposal=options.proposal(),
        temperature=options.temperature,
        precision=options.precision,
        dtypes={name: spec[0] for name, spec in specs.items()},
        counts={
            "examples": sum(shard["examples"] for shard in shards),
            "tokens": sum(shard["tokens"] for shard in shards),
            "response_tokens": positions,
            "truncated": sum(t.truncated for t in tokenized),
        },
        bytes=stored_bytes,
        bytes_per_response_token=stored_bytes / max(positions, 1),
        # Per target position, by array: the kept ids and distributions apart from the tokens.
        bytes_per_response_token_by_array={
            name: size / max(positions, 1) for name, size in sorted(array_bytes.items())
        },
        vocabulary_sha256=vocabulary_sha,
        provenance={
            **identities,
            "data": {
                **sources.fingerprint(source),
                "spec": options.data,
                "columns": {
                    "prompt": options.prompt_field,
                    "response": options.response_field,
                    "messages": options.messages_field,
                    "text": options.text_field,
                    "context": options.context_field,
                },
            },
            "template": template,
            "max_length": options.max_length,
            "model_dtype": options.dtype,
            "tokenizer_notes": tokenizer_notes,
        },
        # The run's options: the manifest reads back as a config (--config CACHE/manifest.json).
        command="cache-teachers",
        options=absolute_paths(options_record(options), type(options)),
        paths=PATHS_ARE,
        shards=shards,
        timing=timing,
    )
