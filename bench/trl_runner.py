"""One TRL training run, as a child process of bench/trl_bench.py (which times it and reads its
peak RSS). Not a benchmark of its own; it needs the `bench` extra (trl).

    python bench/trl_runner.py gkd --student S --teacher T --data train.jsonl --out DIR ...
    python bench/trl_runner.py sft --student S --data train.jsonl --out DIR ...

gkd: GKDTrainer with lmbda=0 (no student generations), beta=0 (the generalised JSD is then the
forward KL(teacher || student)), seq_kd off, temperature 1: supervised token-level KD, the
objective of `deltakd distill --objective kd --sft-weight 0`. sft: SFTTrainer, loss on the
completion only, no packing. Both get the token ids deltakd's tokenizer makes (a pre-tokenised
dataset: input_ids, and labels with -100 on the prompt) through TRL's own collator, so the two
systems train on the same tokens and the same response positions."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def tokenized_dataset(path: str, student: str, max_length: int):
    """deltakd's tokenisation of the rows (alpaca template, its truncation rule), as a datasets
    Dataset of input_ids, labels (-100 on the prompt) and length."""
    from datasets import Dataset

    from deltakd_cli import data, models

    tokenizer = models.load_tokenizer(student)
    tokenized = data.tokenize_all(data.load_examples(path), "alpaca", tokenizer, max_length)
    rows = {
        "input_ids": [t.input_ids for t in tokenized],
        # a token is a label where it is a target (the mask marks the tokens to predict)
        "labels": [
            [i if target else -100 for i, target in zip(t.input_ids, t.target_mask, strict=True)]
            for t in tokenized
        ],
        "length": [len(t.input_ids) for t in tokenized],
    }
    targets = sum(t.num_targets for t in tokenized)
    return tokenizer, Dataset.from_dict(rows), targets


def config_kwargs(options: argparse.Namespace) -> dict:
    """TrainingArguments shared by both trainers, set to what deltakd's loop does. TRL's configs
    default to bf16 and gradient checkpointing; both are turned off (float32 on CPU, no
    recomputation, as deltakd runs here)."""
    return dict(
        output_dir=options.out,
        num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=options.lr,
        lr_scheduler_type="cosine",  # no warmup: 0.5 * (1 + cos(pi * step / steps)), as deltakd
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",  # torch.optim.AdamW, as deltakd
        max_grad_norm=1.0,
        seed=options.seed,
        data_seed=options.seed,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        train_sampling_strategy="group_by_length",  # like deltakd's length-grouped batches
        length_column_name="length",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        max_length=options.max_length,
        packing=False,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def paired(trainer_class: type, order_file: str) -> type:
    """`trainer_class` whose training batches are the rows listed in `order_file`, in order."""
    from torch.utils.data import DataLoader

    batches = json.loads(Path(order_file).read_text())["batches"]

    class PairedTrainer(trainer_class):
        def get_train_dataloader(self) -> DataLoader:
            dataset = self._remove_unused_columns(self.train_dataset, description="Training")
            loader = DataLoader(
                dataset, batch_sampler=batches, collate_fn=self.data_collator, num_workers=0
            )
            return self.accelerator.prepare(loader)

    return PairedTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trainer", choices=("gkd", "sft"))
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-order", help="JSON file of the batches to train on, in order")
    options = parser.parse_args()
    started = time.perf_counter()

    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer, dataset, targets = tokenized_dataset(
        options.data, options.student, options.max_length
    )
    student = AutoModelForCausalLM.from_pretrained(options.student, dtype=torch.float32)
    if options.trainer == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        teacher = AutoModelForCausalLM.from_pretrained(options.teacher, dtype=torch.float32)
        config = GKDConfig(
            **config_kwargs(options),
            lmbda=0.0,  # fraction of batches replaced by student generations: none
            beta=0.0,  # generalised JSD at beta = 0: KL(teacher || student)
            temperature=1.0,
            seq_kd=False,
            max_new_tokens=1,  # unused: nothing is generated with lmbda = 0 and seq_kd off
            disable_dropout=True,
        )
        trainer_class = (
            paired(GKDTrainer, options.batch_order) if options.batch_order else GKDTrainer
        )
        trainer = trainer_class(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            # GKD's default collator renders chat messages; this is TRL's collator for
            # tokenised rows (pads, keeps the labels' -100 on the prompt).
            data_collator=DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id),
        )
    else:
        config = SFTConfig(**config_kwargs(options), completion_only_loss=True)
        trainer = SFTTrainer(
            model=student, args=config, train_dataset=dataset, processing_class=tokenizer
        )
    result = trainer.train()
    trainer.save_model(options.out)
    tokenizer.save_pretrained(options.out)
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "trainer": options.trainer,
        "optimizer_steps": trainer.state.global_step,
        "target_tokens_per_epoch": targets,
        "train_seconds": result.metrics.get("train_runtime"),
        "seconds_in_process": time.perf_counter() - started,
        "batch_order": options.batch_order,
        "log": [
            {"step": e.get("step"), "loss": e.get("loss"), "lr": e.get("learning_rate")}
            for e in steps
        ],
    }
    (Path(options.out) / "trl_run.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
