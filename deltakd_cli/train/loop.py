"""The one training loop for `deltakd distill` and `deltakd finetune`, torchtune-recipe style:
set-up in `_setup_model`, `_setup_data`, `_setup_optimizer`, one loop written out, no HF
Trainer. The pieces it calls have a module each: inputs.py (what it trains on), objective.py
(the student and its loss), step.py (one optimizer step), checkpoint.py (the checkpoint layout),
export.py (the Hugging Face directory and the run record), preflight.py (the memory check before
any weight is loaded)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deltakd_cli import __version__, distributed, faults, models, outputs
from deltakd_cli.console import console, info, progress
from deltakd_cli.errors import DeltakdError, Interrupted
from deltakd_cli.options import PATHS_ARE, absolute_paths, record
from deltakd_cli.tracking import Trackers, log_record, open_trackers
from deltakd_cli.train import batching, checkpoint, lora, preflight
from deltakd_cli.train import step as step_math
from deltakd_cli.train.export import (
    RUN_FILES,
    export_model,
    recorded_run_entries,
    write_card,
    write_record,
)
from deltakd_cli.train.hub import check_hub_access, push_folder
from deltakd_cli.train.inputs import TrainingData, distill_data, finetune_data, with_eval_data
from deltakd_cli.train.objective import (
    ObjectiveModule,
    enable_activation_checkpointing,
)
from deltakd_cli.train.options import (
    OPTIONS_ADDED_LATER,
    OPTIONS_THAT_MATTER,
    DistillOptions,
    FinetuneOptions,
    TrainOptions,
    validate,
)

FINISHED = "finished"  # check_output: OUT already holds this very run


class Trainer:
    """One training run: claim OUT, set up, optionally resume, loop, export."""

    def __init__(self, options: TrainOptions, training_data: TrainingData, tokenizer: Any):
        self.options = options
        self.data = training_data
        self.tokenizer = tokenizer
        self.out = Path(outputs.local_path(options.out))
        self.rank = distributed.rank()
        self.world_size = distributed.world_size()
        self.device = distributed.device_for(options.device)
        self.compute_dtype = models.resolve_dtype(options.dtype, self.device)
        self.identity = self._identity()
        self.lora = lora.settings_of(options)
        self.lock: outputs.OutputLock | None = None
        self.trackers_used: dict[str, Any] = {}

    def _identity(self) -> dict[str, Any]:
        """The options that matter for a resume, as a checkpoint records them."""
        values = {name: getattr(self.options, name, None) for name in OPTIONS_THAT_MATTER}
        values["command"] = self.options.command
        values["compute_dtype"] = str(self.compute_dtype).replace("torch.", "")
        values["world_size"] = self.world_size
        return values

    # -- OUT ----------------------------------------------------------------------------------

    def _claim_output(self) -> tuple[int, Path, dict[str, Any]] | None:
        """(rank 0) Lock OUT for the whole run, then decide fresh start or resume."""
        if self.out.exists() and not self.out.is_dir():
            raise DeltakdError(f"--out {self.out} exists and is not a directory")
        self.lock = outputs.directory_lock(self.out, f"training output {self.out}").acquire()
        return self.check_output()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def check_output(self) -> tuple[int, Path, dict[str, Any]] | str | None:
        """(rank 0, lock held) The checkpoint to resume from with what the resume changes
        (`checkpoint.check_resumable`), None for a fresh start, or FINISHED when OUT holds this
        very run, finished (skipped, as every stage skips complete identical work); refuse what
        cannot work: a directory that is not a training run, a finished run of other settings
        (unless --resume trains it further), checkpoints without --resume (each unless
        --overwrite)."""
        options = self.options
        claim = outputs.claim_directory(
            self.out,
            "training-run",
            "training run",
            options.overwrite,
            planned=RUN_FILES,
            recognise=recorded_run_entries,
        )
        if claim == "ours" and options.overwrite:
            marker = outputs.read_marker(self.out) or {}
            outputs.remove_own_files(self.out, marker.get("files", []))
            outputs.write_marker(self.out, "training-run", RUN_FILES)
            return None
        found = checkpoint.complete_checkpoints(self.out)
        finished = (self.out / "run.json").exists()
        if finished and not options.resume and self._same_finished_run():
            return FINISHED  # the same run, done: skipped, as cache-teachers skips
        if finished and not (options.resume and found):
            raise DeltakdError(
                f"{self.out} already holds a finished run (run.json) with other settings; "
                "choose another --out, pass --overwrite to replace it, or --resume with a "
                "larger --max-steps or --epochs to train it further"
            )
        if options.resume:
            if not found:
                raise DeltakdError(
                    f"--resume: no complete checkpoint under {self.out}/checkpoints; "
                    "drop --resume to start the run"
                )
            step, path = found[-1]
            changes = checkpoint.check_resumable(path, self.identity)
            if finished:
                if "extended" not in changes:
                    raise DeltakdError(
                        f"{self.out} already holds a finished run (run.json): --resume trains it "
                        "further only with a larger --max-steps or --epochs"
                    )
                # the record describes the weights about to be replaced: gone until the export
                (self.out / "run.json").unlink()
            return step, path, changes
        if found:
            raise DeltakdError(
                f"{self.out} has checkpoints of an earlier run: pass --resume to continue it, "
                "--overwrite to start again, or choose another --out"
            )
        return None

    def _same_finished_run(self) -> bool:
        """OUT/run.json records this very run: every option that matters (the data by content)
        as this run would record it."""
        try:
            saved = json.loads((self.out / "run.json").read_text(encoding="utf-8"))
            resolved = saved["resolved"]
            recorded = {**saved["options"], "command": saved["command"],
                        "compute_dtype": resolved["compute_dtype"],
                        "world_size": resolved["world_size"]}  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError):
            return False
        now = json.loads(json.dumps(absolute_paths(self.identity), default=str))
        return all(
            recorded.get(name, OPTIONS_ADDED_LATER.get(name)) == value
            for name, value in now.items()
        )

    # -- set-up -------------------------------------------------------------------------------

    def _setup_model(self) -> None:
        """The student (float32 master weights), a frozen S0 when the objective needs one, the
        loss module, and its DDP/FSDP2 wrapper. With --lora-r the student gets adapters and the
        frozen S0 is the student with its adapters switched off."""
        options = self.options
        torch.manual_seed(options.seed)
        np.random.seed(options.seed)
        random.seed(options.seed)
        student = self._load_student()
        self.vocab_size = models.check_model_vocab(student, self.data.vocab_size, "student")
        self.export_dtype = models.stored_dtype(options.student, options.load_settings())
        frozen = None
        if self.data.needs_frozen_student and self.lora is None:
            frozen = copy.deepcopy(student)
            frozen.requires_grad_(False)
            frozen.eval()
            if not options.fsdp:  # FSDP2 keeps one dtype per group; it casts via its policy
                frozen.to(self.compute_dtype)
        if options.gradient_checkpointing:
            enable_activation_checkpointing(student)
        student.config.use_cache = False
        if self.lora is not None:
            # after the model-level switches above, which peft's wrapper would not forward
            student = lora.add_adapters(student, self.lora)
        student.train()
        self.student = student
        self.module = ObjectiveModule(
            student,
            options,
            self.vocab_size,
            self.compute_dtype,
            frozen,
            self.data.facts,
            frozen_is_adapter_disabled=self.data.needs_frozen_student and self.lora is not None,
            tail=self.data.tail,
        )
        if options.fsdp:
            self.wrapped = self._fully_shard(self.module)
        elif self.world_size > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        else:
            self.wrapped = self.module

    def _load_student(self) -> nn.Module:
        """The student in float32 (the master weights), or for QLoRA its frozen weights in 4 bits
        (bitsandbytes places them on the device itself)."""
        options = self.options
        load = options.load_settings()
        if self.lora is not None and self.lora.four_bit:
            from peft import prepare_model_for_kbit_training

            student = models.load_model(
                options.student,
                torch.float32,
                settings=load,
                device_map={"": str(self.device)},
                quantization_config=lora.four_bit_config(self.compute_dtype),
            )
            # checkpointing, if asked for, is switched on by the caller (non-reentrant)
            return prepare_model_for_kbit_training(student, use_gradient_checkpointing=False)
        load_device = torch.device("cpu") if options.fsdp else self.device
        return models.load_model(options.student, torch.float32, load_device, settings=load)

    def _fully_shard(self, module: ObjectiveModule) -> nn.Module:
        """FSDP2: every decoder layer is its own unit; the root unit (module) holds embeddings,
        final norm and output layer, which stay gathered for the whole forward."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        for model in (module.student, module.frozen_student):
            if model is None:
                continue
            _, layers = models.decoder_layers(model)
            for layer in layers:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        return module

    def _setup_data(self) -> None:
        """The batch plan of the whole run (a function of the seed and the epoch)."""
        options = self.options
        self.plan = batching.RunPlan(
            [self.data.store.shard_lengths(s) for s in range(self.data.store.num_shards)],
            seed=options.seed,
            batch_size=options.batch_size,
            max_tokens=options.max_tokens_per_batch,
            world_size=self.world_size,
            grad_accum=options.grad_accum,
            epochs=options.epochs,
            max_steps=options.max_steps or None,
        )
        self.total_steps = self.plan.total_steps

    def _setup_optimizer(self) -> None:
        """AdamW and the warmup-cosine schedule."""
        self.warmup_steps = step_math.warmup_steps_of(self.options.warmup, self.total_steps)
        self.optimizer = step_math.make_optimizer(self.module, self.options)
        total, warmup = self.total_steps, self.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: step_math.lr_factor(step, warmup, total)
        )

    # -- checkpoints --------------------------------------------------------------------------

    def _model_state(self) -> dict[str, torch.Tensor]:
        return checkpoint.model_state(self.module, self.student, self.options.fsdp)

    def _save_checkpoint(self, step: int) -> Path:
        epoch, within = self.plan.locate(step)
        position = {
            "epoch": epoch,
            "step_in_epoch": within,
            "total_steps": self.total_steps,
            "options": self.identity,
        }
        return checkpoint.write_checkpoint(
            self.out,
            step,
            self._model_state(),
            checkpoint.optimizer_state(self.module, self.optimizer, self.options.fsdp),
            self.scheduler.state_dict(),
            position,
            self.options.keep_checkpoints,
        )

    def _load_checkpoint(self, path: Path) -> int:
        saved = checkpoint.read_checkpoint(path)
        fsdp = self.options.fsdp
        checkpoint.load_model_state(self.module, self.student, fsdp, saved.model)
        checkpoint.load_optimizer_state(self.module, self.optimizer, fsdp, saved.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        # the lr of the next step from this run's schedule (the same value unless a resume
        # trains further, which stretches the cosine)
        step = self.scheduler.last_epoch
        for group, base, factor in zip(
            self.optimizer.param_groups,
            self.scheduler.base_lrs,
            self.scheduler.lr_lambdas,
            strict=True,
        ):
            group["lr"] = base * factor(step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        return saved.step

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        resume_from = distributed.on_main_first(self._claim_output)
        if resume_from == FINISHED:
            info(f"[green]{self.out} already holds this run[/green] (run.json); nothing to do")
            return json.loads((self.out / "run.json").read_text(encoding="utf-8"))
        self._setup_model()
        self._setup_data()
        self._setup_optimizer()
        start_step = 0
        self.resumed: dict[str, Any] | None = None
        if resume_from is not None:
            start_step = self._load_checkpoint(resume_from[1])
            info(f"resuming from {resume_from[1]} (step {start_step} of {self.total_steps})")
            _, path, changes = resume_from
            self.resumed = {"from_step": start_step, **changes}
            if "extended" in changes:
                self.resumed["schedule"] = {
                    "total_steps": [checkpoint.saved_total_steps(path), self.total_steps],
                    "warmup_steps": self.warmup_steps,
                }
            self._resume_notes(self.resumed)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(self.out / "metrics.jsonl", start_step)
        distributed.barrier("the start of training")
        metrics = self._loop(start_step)
        return self._export(metrics)

    def _resume_notes(self, resumed: dict[str, Any]) -> None:
        """One note per change a resume is allowed (its record, `self.resumed`): a moved cache or
        data file, a run trained further with the schedule's new shape."""
        for what in ("cache", "data"):
            if f"{what}_moved" in resumed:
                was, now = resumed[f"{what}_moved"]
                info(f"[yellow]note:[/yellow] the {what} moved: {was} -> {now} (the same "
                     "checksum, so the same content)")  # fmt: skip
        if "extended" in resumed:
            saved_total, total = resumed["schedule"]["total_steps"]
            grown = ", ".join(f"--{k.replace('_', '-')} {a} -> {b}"
                              for k, (a, b) in resumed["extended"].items())  # fmt: skip
            info(
                f"[yellow]note:[/yellow] training further ({grown}): the warmup-cosine "
                f"schedule now spans {total} steps (was {saved_total}; warmup "
                f"{self.warmup_steps}), so the lr resumes at {self.scheduler.get_last_lr()[0]:.3g} "
                f"and decays to 0 by step {total}"
            )

    def _export(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The model directory and the run's record (every rank gathers the state; rank 0
        writes)."""
        model_state = self._model_state()
        best = checkpoint.read_best(self.out) if self.options.keep_best else None
        if best is not None and self.rank == 0:
            model_state = checkpoint.best_weights(self.out)
            info(f"exporting the best held-out weights: step {best['step']}, "
                 f"held-out loss {best['eval_loss']:.4f}")  # fmt: skip
        summary = {
            "tool": "deltakd",
            "version": __version__,
            "command": self.options.command,
            "options": absolute_paths(record(self.options), type(self.options)),
            "paths": PATHS_ARE,  # every local path of `options` is absolute
            "resolved": {
                "objective": self.options.objective,
                "world_size": self.world_size,
                "device": str(self.device),
                "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
                "export_dtype": str(self.export_dtype).replace("torch.", ""),
                "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps,
                "vocab_size": self.vocab_size,
                "use_cached_student": self.data.use_cached_student,
                "frozen_student": self.data.needs_frozen_student,
                "cached_tail_shift": self.data.use_cached_tail_shift,
                "tail": None if self.data.tail is None else self.data.tail.label,
                "tail_default": self.data.tail_is_default,
                "trackers": self.trackers_used,
                "exported_step": best["step"] if best is not None else self.total_steps,
                "lora": self._lora_record(),
                "resumed": self.resumed,
            },
            "provenance": self.data.provenance,
            "student": None,
            "final_metrics": metrics,
        }
        if self.rank == 0:
            load = self.options.load_settings()
            summary["student"] = models.model_identity(self.options.student, self.tokenizer, load)
            self._export_model(model_state)
            write_card(self.out, summary)
            write_record(self.out, summary)
        distributed.barrier("the export")
        return summary

    def _export_model(self, model_state: dict[str, torch.Tensor]) -> None:
        """(rank 0) OUT as a Hugging Face model; a LoRA student's adapters are merged into its
        weights, and --save-adapter adds the adapter alone under OUT/adapter."""
        if self.lora is None:
            export_model(
                self.out,
                self.student,
                self.tokenizer,
                model_state,
                self.export_dtype,
                self.data.template,
            )
            return
        base = None
        if self.lora.four_bit:  # merge into the float weights, not the 4-bit ones trained on
            plain = models.load_model(
                self.options.student, torch.float32, settings=self.options.load_settings()
            )
            base = plain.state_dict()
        adapter_state = model_state

        def write_adapter(staging: Path) -> None:
            lora.save_adapter(staging / lora.ADAPTER_DIR, self.student, adapter_state)

        export_model(
            self.out,
            lora.hf_model(self.student),
            self.tokenizer,
            lora.merged_state(model_state, self.lora.scaling, base),
            self.export_dtype,
            self.data.template,
            also_write=write_adapter if self.options.save_adapter else None,
        )

    def _lora_record(self) -> dict[str, Any] | None:
        if self.lora is None:
            return None
        return {**self.lora.describe(), **lora.parameter_counts(self.student)}

    def _loop(self, start_step: int) -> dict[str, Any]:
        options = self.options
        dataset = batching.MicroBatchDataset(
            self.data.store,
            self.plan,
            self.rank,
            start_step,
            self.total_steps,
            self.tokenizer.pad_token_id,
            with_student=self.data.use_cached_student,
            with_tail_shift=self.data.use_cached_tail_shift,
        )
        loader = batching.micro_batch_loader(
            dataset, options.num_workers, pin_memory=self.device.type == "cuda"
        )
        batches = iter(loader)
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        max_norm = options.max_grad_norm or float("inf")
        history: list[dict[str, Any]] = []
        tokens_done = 0
        # cumulative over the whole run, a resumed one included (the plan knows every step)
        tokens_seen = sum(self.plan.step_targets(s) for s in range(start_step))
        started = time.perf_counter()
        metrics_file = open(self.out / "metrics.jsonl", "a") if self.rank == 0 else None
        best = checkpoint.read_best(self.out, through_step=start_step) if start_step else None
        best_loss = best["eval_loss"] if best is not None else math.inf
        last_eval: dict[str, float] = {}
        trackers, failed = Trackers(), True
        try:
            trackers = self._open_trackers()
            with progress() as bar:
                task = bar.add_task(
                    options.command, total=self.total_steps, completed=start_step, status=""
                )
                for step in range(start_step, self.total_steps):
                    step_started = time.perf_counter()
                    micro = [next(batches) for _ in range(self.plan.grad_accum)]
                    global_targets = self.plan.step_targets(step)
                    totals = step_math.accumulate_gradients(
                        self.wrapped, micro, global_targets, self.world_size, self.device
                    )
                    totals = distributed.all_reduce_sum(totals) / global_targets
                    loss, sft, distill = (float(v) for v in totals.tolist())
                    grad_norm = step_math.clip_grad_norm(trainable, max_norm)
                    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                        self._stop_on_non_finite(step + 1, loss, grad_norm)
                    lr = self.scheduler.get_last_lr()[0]
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    seconds = time.perf_counter() - step_started
                    tokens_done += global_targets
                    tokens_seen += global_targets
                    epoch, _ = self.plan.locate(step)
                    record = {
                        "step": step + 1,
                        "epoch": epoch,
                        "loss": loss,
                        "sft": sft,
                        "distill": distill,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "target_tokens": global_targets,
                        "target_tokens_seen": tokens_seen,
                        "tokens_per_s": global_targets / max(seconds, 1e-9),
                        "elapsed_s": time.perf_counter() - started,
                    }
                    evaluated = self._evaluate_now(step + 1)
                    if evaluated:
                        last_eval = self._held_out_loss()
                        record.update(last_eval)
                        if options.keep_best and last_eval["eval_loss"] < best_loss:
                            best_loss = last_eval["eval_loss"]
                            self._save_best(step + 1, best_loss)
                    history.append(record)
                    history = history[-50:]
                    if metrics_file is not None and (
                        (step + 1) % options.log_every == 0
                        or step + 1 == self.total_steps
                        or evaluated
                    ):
                        with outputs.writing(self.out / "metrics.jsonl"):
                            faults.point("metrics")
                            metrics_file.write(json.dumps(record) + "\n")
                            metrics_file.flush()
                        log_record(trackers, record)
                    bar.update(task, completed=step + 1, status=_status(record, options.objective))
                    # the last step too: a finished run can then be trained further (--resume
                    # with a larger --max-steps or --epochs)
                    if options.save_every and (
                        (step + 1) % options.save_every == 0 or step + 1 == self.total_steps
                    ):
                        self._save_checkpoint(step + 1)
            failed = False
        finally:
            if metrics_file is not None:
                metrics_file.close()
            trackers.close(failed=failed)
        elapsed = time.perf_counter() - started
        last = history[-10:]
        return {
            "steps": self.total_steps,
            "resumed_at_step": start_step,
            "final_loss": history[-1]["loss"] if history else None,
            "final_sft": history[-1]["sft"] if history else None,
            "final_distill": history[-1]["distill"] if history else None,
            "mean_loss_last_10": sum(r["loss"] for r in last) / len(last) if last else None,
            "target_tokens": tokens_done,
            "seconds": elapsed,
            "tokens_per_s": tokens_done / elapsed if elapsed > 0 else None,
            **last_eval,
            **(
                {"best_eval_loss": best_loss}
                if options.keep_best and math.isfinite(best_loss)
                else {}
            ),
        }

    # -- held-out loss ------------------------------------------------------------------------

    def _evaluate_now(self, step: int) -> bool:
        if self.data.eval_store is None:
            return False
        every = self.options.eval_every
        return step == self.total_steps or (every > 0 and step % every == 0)

    def _held_out_loss(self) -> dict[str, float]:
        """The objective and its parts over every held-out example, per target token (each rank
        takes every world_size-th batch; the sums are all-reduced). Dropout is off; nothing here
        draws random numbers, so training goes on exactly as without it."""
        store = self.data.eval_store
        specs = batching.evaluation_batches(
            store, self.options.batch_size, self.options.max_tokens_per_batch
        )
        targets = sum(spec.num_targets for spec in specs)
        mine = specs[self.rank :: self.world_size]
        rounds = -(-len(specs) // self.world_size)
        # DDP's forward syncs buffers, so it is skipped; FSDP2 gathers shards collectively, so
        # every rank runs the same number of forwards (a rank short of batches repeats one).
        forward = self.wrapped if self.options.fsdp else self.module
        totals = torch.zeros(3, device=self.device)
        self.student.eval()
        try:
            with torch.no_grad():
                for index in range(rounds):
                    if index >= len(mine) and not self.options.fsdp:
                        break
                    spec = mine[index] if index < len(mine) else specs[0]
                    examples = batching.read_batch(store, spec)
                    batch = batching.collate(
                        examples,
                        self.tokenizer.pad_token_id,
                        self.data.use_cached_student,
                        self.data.use_cached_tail_shift,
                    )
                    sums = forward(step_math.batch_to(batch, self.device))
                    if index < len(mine):
                        totals += sums.float()
        finally:
            self.student.train()
        loss, sft, distill = (float(v) for v in (distributed.all_reduce_sum(totals) / targets))
        return {
            "eval_loss": loss,
            "eval_sft": sft,
            "eval_distill": distill,
            "eval_target_tokens": targets,
        }

    def _save_best(self, step: int, eval_loss: float) -> None:
        state = self._model_state()  # every rank (FSDP2 gathers); rank 0 writes
        if self.rank == 0:
            checkpoint.write_best(self.out, step, state, eval_loss)
        distributed.barrier("the best checkpoint")

    def _open_trackers(self) -> Trackers:
        """(rank 0) The --report-to trackers, with the run's options as parameters; a tracker
        that cannot start stops every rank with its one line."""
        opened = Trackers()

        def start() -> None:
            nonlocal opened
            name = self.out.resolve().name
            opened = open_trackers(
                self.options.report_to,
                self.out,
                name,
                record(self.options),
                job_type=self.options.command,
            )
            self.trackers_used = opened.describe()

        distributed.on_main_first(start)
        return opened

    def _stop_on_non_finite(self, step: int, loss: float, grad_norm: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        sound = checkpoint.last_sound_checkpoint(self.out) if self.rank == 0 else None
        if self.rank != 0:
            kept = "rank 0 names the checkpoint to resume from"
        elif sound is None:
            kept = "no checkpoint with finite weights was written before it"
        else:
            kept = (
                f"the newest checkpoint with a finite loss and finite weights is {sound[1]} (its "
                f"largest weight is {sound[2]:.3g}: a diverging run can have huge finite "
                "weights; check metrics.jsonl before resuming from it)"
            )
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        raise DeltakdError(f"non-finite {what} at step {step}: training stopped; {kept}")


def _truncate_metrics(path: Path, keep_through_step: int) -> None:
    """On resume, drop metric lines the interrupted run wrote after its last checkpoint."""
    if not path.exists():
        return
    if keep_through_step == 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= keep_through_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut by the kill
    outputs.atomic_write_text(path, "".join(line + "\n" for line in kept))


def _status(record: dict[str, Any], objective: str) -> str:
    parts = [f"loss {record['loss']:.4f}"]
    if objective != "sft":
        parts += [f"sft {record['sft']:.4f}", f"distill {record['distill']:.4f}"]
    parts += [f"lr {record['lr']:.2e}", f"{record['tokens_per_s']:,.0f} tok/s"]
    if "eval_loss" in record:
        parts.append(f"held-out {record['eval_loss']:.4f}")
    return " ".join(parts)


def print_summary(summary: dict[str, Any], out: str) -> None:
    """The closing lines (rank 0)."""
    if not distributed.is_main_process():
        return
    metrics = summary["final_metrics"]
    loss = metrics.get("final_loss")
    console.print(
        f"[green]done[/green]: {metrics['steps']} steps, "
        f"{metrics['target_tokens']:,} target tokens in {metrics['seconds']:.1f}s "
        f"({(metrics['tokens_per_s'] or 0):,.0f} tok/s)"
        + (f", final loss {loss:.4f}" if loss is not None else "")
    )
    console.print(f"model: {out}  (run.json, metrics.jsonl)")


def _run(options: TrainOptions, prepare: Callable[[Any], TrainingData]) -> dict[str, Any]:
    validate(options)
    if options.push_to_hub and distributed.is_main_process():  # before any cost: one line
        check_hub_access(options.push_to_hub, "--push-to-hub")
    device = distributed.device_for(options.device)
    models.check_device(device)
    distributed.init(device, options.resolved_dist_timeout())
    if options.fsdp and not distributed.is_distributed():
        raise DeltakdError(
            "--fsdp shards the student over processes: launch with torchrun "
            "(torchrun --nproc_per_node N -m deltakd_cli ...)"
        )
    if options.lora_4bit:
        lora.check_four_bit(device)
        if options.fsdp:
            raise DeltakdError("--lora-4bit does not shard: drop --fsdp (4-bit weights are small)")
    trainer = None
    succeeded = False
    try:
        options.load_settings().check(device)
        tokenizer = models.load_tokenizer(options.student, options.load_settings())
        training_data = prepare(tokenizer)
        preflight.check_memory(options, device, preflight.longest_example(training_data))
        options = dataclasses.replace(options, source=training_data.source)
        trainer = Trainer(options, training_data, tokenizer)
        summary = trainer.run()
        print_summary(summary, options.out)
        succeeded = True
    except KeyboardInterrupt:
        raise Interrupted(_resume_hint(options)) from None
    finally:
        if trainer is not None:
            trainer.release()
        distributed.shutdown(clean=succeeded)
    if options.push_to_hub and distributed.is_main_process():  # after the group: no timeout
        push_folder(options.out, options.push_to_hub, private=options.hub_private)
    return summary


def _resume_hint(options: TrainOptions) -> str:
    """What to type after Ctrl-C: --resume when a checkpoint exists, else the same command."""
    found = checkpoint.complete_checkpoints(Path(options.out))
    if found:
        step, path = found[-1]
        how = "the same command" if options.resume else "the same command with --resume"
        return f"{options.command} stopped; rerun {how} to continue from {path} (step {step})"
    return (
        f"{options.command} stopped before its first checkpoint (--save-every "
        f"{options.save_every}); rerun the same command to start again"
    )


def _with_held_out(
    options: TrainOptions, read: Callable[[Any, Any], TrainingData], data_field: str
) -> Callable[[Any], TrainingData]:
    """The training data as `read` gives it, with --eval-data read the same way (the options'
    `data_field` pointed at it) as its held-out examples."""

    def prepare(tokenizer: Any) -> TrainingData:
        training = read(options, tokenizer)
        if options.eval_data is None:
            return training
        held_out_options = dataclasses.replace(options, **{data_field: options.eval_data})
        return with_eval_data(training, read(held_out_options, tokenizer), options.eval_data)

    return prepare


def distill(options: DistillOptions) -> dict[str, Any]:
    """`deltakd distill`: train the student on a teachers' cache."""
    outputs.check_not_input(
        options.out,
        {"--cache": options.cache, "--student": options.student, "--eval-data": options.eval_data},
    )

    return _run(options, _with_held_out(options, distill_data, "cache"))


def finetune(options: FinetuneOptions) -> dict[str, Any]:
    """`deltakd finetune`: supervised finetuning on a JSONL file (objective sft)."""
    outputs.check_not_input(
        options.out,
        {"--model": options.model, "--data": options.data, "--eval-data": options.eval_data},
    )
    max_length = models.resolve_max_length(
        options.max_length, {"--model": options.model}, options.load_settings()
    )
    options = dataclasses.replace(options, max_length=max_length)

    return _run(options, _with_held_out(options, finetune_data, "data"))
