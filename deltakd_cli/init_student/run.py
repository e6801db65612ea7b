"""`deltakd init-student`: prune, then heal the copy by KD from the source, running its
sub-stages (cache-teachers, distill) through the same `run_command` as the pipeline's stages."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deltakd_cli import __version__, data, faults, models, outputs, sources
from deltakd_cli.cache.manifest import CacheRecord
from deltakd_cli.cache.options import CacheOptions
from deltakd_cli.cache.schema import FORMAT_VERSION
from deltakd_cli.console import info
from deltakd_cli.errors import DeltakdError, Interrupted
from deltakd_cli.init_student import prune
from deltakd_cli.init_student.layers import (
    block_influence,
    choose_layers,
    parse_layers,
    resolve_rule,
)
from deltakd_cli.init_student.options import InitStudentOptions
from deltakd_cli.option_groups import DataOptions
from deltakd_cli.options import PATHS_ARE, absolute_paths, check
from deltakd_cli.options import record as options_record
from deltakd_cli.sources import DataSource
from deltakd_cli.train.checkpoint import complete_checkpoints
from deltakd_cli.train.options import DistillOptions

Runner = Callable[[str, Any], Any]  # commands.run_command: a command's name and its options
INFLUENCE_DOCUMENTS = 32  # healing documents the block-influence scores are measured on

MARKER = outputs.STUDENT_RECORD  # init-student.json, written last


def heal_source(options: InitStudentOptions, rows: str) -> tuple[DataSource, data.Columns | None]:
    """The healing rows as a source: the user's own (with --split and the column options), or
    the text rows written from a .txt file (as they are)."""
    if rows == options.heal_data:
        return options.data_source(rows), data.columns_of(options)
    return DataSource(rows), None


def heal_rows(options: InitStudentOptions, work: Path, write: bool = True) -> tuple[str, str]:
    """The healing rows cache-teachers reads (a data spec) and the template to read them with.

    Rows of plain text (`text`, or --text-field) are used as they are: every token is a target
    (language-model loss). A .txt file is one document per non-empty line, written as text rows
    under the work dir. Rows in the task formats (prompt/response, Alpaca, chat...) are used as
    they are too, with the plain template for prompt/response rows, else alpaca."""
    source = options.data_source(str(options.heal_data))
    if source.path.suffix == ".txt" and source.path.is_file():
        rows = sources.text_file_rows(source.path)
        rows_file = work / "heal-rows.jsonl"
        if write:  # (under torchrun only rank 0 writes; the others read the same file)
            rows_file.parent.mkdir(parents=True, exist_ok=True)
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            outputs.atomic_write_text(rows_file, text)
        return str(rows_file), "plain"
    examples = data.load_examples(source, columns=data.columns_of(options), train_turns="all")
    first = examples[0]
    return str(options.heal_data), "plain" if first.text or first.raw_prompt else "alpaca"


def keyed_dir(path: Path, key: dict[str, Any]) -> bool:
    """Make `path` belong to `key`. A sidecar file `<path>.key.json` records the key of what is
    in `path`; when it differs, `path` is cleared (it holds work of other settings). Returns
    True when `path` already belonged to `key` (its content may be complete or resumable)."""
    sidecar = path.with_name(path.name + ".key.json")
    try:
        if json.loads(sidecar.read_text()) == key:
            return True
    except (OSError, json.JSONDecodeError):
        pass
    if path.exists():
        shutil.rmtree(path)
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write_text(sidecar, json.dumps(key, indent=2, sort_keys=True) + "\n")
    return False


# Options that do not change the student (where and how fast it is made).
_NOT_IN_KEY = ("out", "work_dir", "overwrite", "device", "num_workers", "heal_data", "save_every")


def settings_key(options: InitStudentOptions, source_sha: str, heal_sha: str | None) -> str:
    """Equal keys mean a rerun would make the same student (the kept layers are a function of
    the source, the rule and the healing text, all in the key)."""
    settings = {k: v for k, v in options_record(options).items() if k not in _NOT_IN_KEY}
    settings.update(source_sha256=source_sha, heal_sha256=heal_sha)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def read_marker(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def init_student(options: InitStudentOptions, run_command: Runner) -> dict[str, Any]:
    """Prune and (with heal data) heal; returns the record written to OUT/init-student.json.
    A rerun with the same settings finds OUT complete and does nothing; an interrupted one
    reuses the pruned copy and the healing cache, and resumes healing from its checkpoint.
    Under torchrun the cache and the healing run are data-parallel; rank 0 does the files."""
    from deltakd_cli import distributed

    _validate(options)
    distributed.init(distributed.device_for(options.device), options.resolved_dist_timeout())
    main = distributed.is_main_process()
    out, work = Path(options.out), options.work_path
    load = options.load_settings()
    tokenizer = models.load_tokenizer(options.source, load)
    num_layers = prune.source_layers(options.source, load)
    rule = (
        "explicit"
        if options.keep_layers
        else resolve_rule(options.layer_rule, bool(options.heal_data))
    )
    source_identity = distributed.broadcast_object(
        models.model_identity(options.source, tokenizer, load) if main else None
    )
    heal_sha = None
    if options.heal_data:
        heal_sha = sources.fingerprint(options.data_source(options.heal_data))["sha256"]
    key = settings_key(options, source_identity["weights_sha256"], heal_sha)
    marker = read_marker(out)
    if marker and marker.get("settings_key") == key:
        info(f"[green]{out} is already complete[/green] for these settings; nothing to do")
        return marker
    locks: list[outputs.OutputLock] = []

    def claim() -> None:
        if out.exists() and not out.is_dir():
            raise DeltakdError(f"--out {out} exists and is not a directory")
        locks.append(outputs.directory_lock(out, f"student {out}").acquire())
        locks.append(outputs.directory_lock(work, f"work directory {work}").acquire())
        _claim_out(out, work, bool(marker), options.overwrite)

    try:
        distributed.on_main_first(claim)
        return _init_student(
            options, run_command, tokenizer, num_layers, rule, source_identity, heal_sha, key
        )
    except (KeyboardInterrupt, Interrupted):  # its inner cache-teachers or distill's words
        raise Interrupted(
            "init-student stopped; rerun the same command to continue (the pruned copy, the "
            "healing cache and the healing checkpoints are kept)"
        ) from None
    finally:
        for lock in locks:
            lock.release()


# What init-student creates in its work dir: listed in the work dir's marker when it is claimed.
WORK_NAMES = (
    "heal-rows.jsonl", "pruned", "pruned.key.json", "healed", "healed.key.json", "heal-cache",
    "heal-cache.key.json",
)  # fmt: skip


def _claim_out(out: Path, work: Path, has_record: bool, overwrite: bool) -> None:
    """OUT may be new, empty, or an init-student output (one made with other settings only with
    --overwrite); the work dir new, empty or init-student's. Ownership by proof (outputs.py):
    a directory holding anything deltakd did not create is refused naming it."""
    state = outputs.claim_directory(out, "student", "student directory", overwrite)
    if state == "ours" and has_record and not overwrite:
        raise DeltakdError(
            f"{out} already holds a student made with other settings; pass --overwrite to "
            "replace it (only the files deltakd created are removed), or choose another --out"
        )
    outputs.claim_directory(
        work,
        "init-student-work",
        "init-student work directory",
        overwrite,
        planned=WORK_NAMES,
        option="--work-dir",
    )


def _init_student(
    options: InitStudentOptions,
    run_command: Runner,
    tokenizer: Any,
    num_layers: int,
    rule: str,
    source_identity: dict[str, Any],
    heal_sha: str | None,
    key: str,
) -> dict[str, Any]:
    from deltakd_cli import distributed

    main = distributed.is_main_process()
    out, work = Path(options.out), options.work_path
    if main:
        work.mkdir(parents=True, exist_ok=True)
    heal_file, template = None, "plain"
    if options.heal_data:
        heal_file, template = heal_rows(options, work, write=main)
        distributed.barrier()
    scores = None
    if rule == "explicit":
        keep = parse_layers(options.keep_layers, num_layers)
    else:
        count = options.layers or max(1, num_layers // 3)
        if rule == "block-influence":
            scores = distributed.broadcast_object(
                measure_influence(options, heal_file, template) if main else None
            )
        keep = choose_layers(num_layers, count, rule, scores)

    pruned_dir = work / "pruned"
    prune_key = {"source_sha256": source_identity["weights_sha256"], "keep": keep}
    if main:
        if keyed_dir(pruned_dir, prune_key) and (pruned_dir / "config.json").is_file():
            info(f"reusing the pruned copy in {pruned_dir}")
        else:
            info(f"pruning {options.source}: keeping {len(keep)} of {num_layers} layers {keep}")
            prune.prune(options.source, keep, pruned_dir, options.load_settings())
    distributed.barrier()

    record: dict[str, Any] = {
        "tool": "deltakd",
        "version": __version__,
        "command": "init-student",
        "settings_key": key,
        "source": source_identity,
        "source_layers": num_layers,
        "kept_layers": keep,
        "layer_rule": rule,
        "layer_scores": scores,
        "pruned_copy": str(pruned_dir.resolve()),
        "options": absolute_paths(options_record(options), type(options)),
        "paths": PATHS_ARE,
        "healed": bool(options.heal_data),
    }
    healed_dir = work / "healed"
    if options.heal_data:
        cache_dir = work / "heal-cache"
        cache_key = {  # what decides the cache's content (it is reused across healing runs)
            "format_version": FORMAT_VERSION,  # a cache of an older deltakd is made anew
            "source_sha256": source_identity["weights_sha256"],
            "heal_sha256": heal_sha,
            "top_k": options.top_k,
            "tail_samples": options.tail_samples,
            "max_length": options.max_length,
            "batch_size": options.cache_batch_size,
            "dtype": options.dtype,
        }
        if main:
            keyed_dir(cache_dir, cache_key)
        distributed.barrier()
        info("healing 1/2: the source's distribution over the healing text (Delta = 0: KD)")
        manifest = run_command(
            "cache-teachers",
            CacheOptions(
                teacher_base=options.source,
                teacher_tuned=options.source,
                data=heal_file,
                **(_data_fields(options) if heal_file == options.heal_data else {}),
                revision=options.revision,
                trust_remote_code=options.trust_remote_code,
                attn_implementation=options.attn_implementation,
                out=str(cache_dir),
                top_k=options.top_k,
                tail_samples=options.tail_samples,
                max_length=options.max_length,
                template=template,
                batch_size=options.cache_batch_size,
                dtype=options.dtype,
                device=options.device,
            ),
        )
        resume = False
        if main:
            resume = keyed_dir(healed_dir, {"settings_key": key}) and bool(
                complete_checkpoints(healed_dir)
            )
            if resume:
                info(f"healing: resuming from {healed_dir}/checkpoints")
            elif (healed_dir / "run.json").exists():
                shutil.rmtree(healed_dir)  # a finished run never recorded in OUT: redo it
        resume = bool(distributed.broadcast_object(resume))
        distributed.barrier()
        info("healing 2/2: distilling the source into the pruned copy (objective kd)")
        summary = run_command(
            "distill",
            DistillOptions(
                cache=str(cache_dir),
                out=str(healed_dir),
                student=str(pruned_dir),
                objective="kd",
                sft_weight=options.sft_weight,
                epochs=options.heal_epochs,
                max_steps=options.heal_steps,
                lr=options.lr,
                warmup=options.warmup,
                batch_size=options.batch_size,
                save_every=options.save_every,
                resume=resume,
                seed=options.seed,
                dtype=options.dtype,
                device=options.device,
                num_workers=options.num_workers,
                attn_implementation=options.attn_implementation,
            ),
        )
        record["heal"] = {
            "data": {"spec": options.heal_data, "sha256": heal_sha},
            "cache": str(cache_dir.resolve()),
            "response_tokens": CacheRecord.from_json(manifest).counts.get("response_tokens"),
            "final_metrics": summary.get("final_metrics"),
        }
    else:
        info(
            "[yellow]not healed[/yellow] (no --heal-data): a pruned copy used as is makes a poor "
            "base student for Delta-KD; heal it on unlabelled text"
        )
    if main:
        _finish(out, pruned_dir, healed_dir if options.heal_data else None, record)
        info(f"[green]wrote {out}[/green]: {len(keep)} of {num_layers} layers of {options.source}")
    distributed.barrier()
    return record


def _data_fields(options: InitStudentOptions) -> dict[str, Any]:
    """The reading options of the user's healing data, for the healing cache."""
    return {field.name: getattr(options, field.name) for field in dataclasses.fields(DataOptions)}


def _finish(out: Path, pruned_dir: Path, healed_dir: Path | None, record: dict) -> None:
    """OUT gets the student's files (checkpoints stay in the work dir) and the record, last.
    Files a previous init-student put there go first; anything else in OUT stays."""
    source = healed_dir or pruned_dir
    skip = (MARKER, outputs.MARKER, outputs.LOCK)  # the healing run's own marker stays there
    names = [p.name for p in source.iterdir() if p.is_file() and p.name not in skip]
    previous = outputs.read_marker(out) or {}
    with outputs.writing(out):
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).unlink(missing_ok=True)  # nothing looks complete while files change
        outputs.remove_own_files(out, previous.get("files", []))
        outputs.write_marker(out, "student", [*names, MARKER])
        for name in names:
            faults.point(f"student {name}")
            staged = out / (name + outputs.PARTIAL_SUFFIX)
            shutil.copy2(source / name, staged)
            os.replace(staged, out / name)
    outputs.atomic_write_text(out / MARKER, json.dumps(record, indent=2, default=str) + "\n")


def _validate(options: InitStudentOptions) -> None:
    check(options)
    options.refuse_float16_training()
    if options.layers is not None and options.keep_layers:
        raise DeltakdError("give either --layers or --keep-layers, not both")
    resolve_rule(options.layer_rule, bool(options.heal_data))
    if options.heal_data and options.data_source(options.heal_data).kind == "jsonl":
        if not Path(options.heal_data).is_file():
            raise DeltakdError(f"--heal-data not found: {options.heal_data}")
    options.load_settings().check()
    models.resolve_source(options.source)
    inputs = {"--student-from": options.source, "--heal-data": options.heal_data}
    outputs.check_not_input(options.out, inputs)
    outputs.check_not_input(options.work_path, inputs, option="--work-dir")


def measure_influence(options: InitStudentOptions, rows: str, template: str) -> list:
    """Block influence of every source layer over the first healing documents."""
    load = options.load_settings()
    tokenizer = models.load_tokenizer(options.source, load)
    source, columns = heal_source(options, rows)
    examples = data.load_examples(source, columns=columns, train_turns="all")
    examples = examples[:INFLUENCE_DOCUMENTS]
    tokenized = data.tokenize_all(examples, template, tokenizer, options.max_length)
    dtype = models.stored_dtype(options.source, load)
    model = models.load_model(options.source, dtype, torch.device("cpu"), settings=load)
    models.check_model_vocab(model, len(tokenizer), f"model {options.source} (its tokenizer's ids)")
    info(f"measuring the block influence of each layer on {len(tokenized)} documents")
    return block_influence(model, [t.input_ids for t in tokenized])
