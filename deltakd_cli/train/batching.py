"""Length-grouped batch plans and the collation of examples into the trainer's batch dict.

A *store* holds examples in shards, each shard sorted by length (the cache's layout; JSONL data
is put in the same shape by `TokenizedStore`). The plan of an epoch is a deterministic function of
(seed, epoch): per shard, the length-sorted rows are cut into windows of a few batches
(`WINDOW_BATCHES`, boundaries shifted by a seeded offset); the rows of each window are shuffled
and dealt into batches, so the seed decides which rows share a batch, not only the order of the
batches, while every batch keeps rows of similar length (little padding) that lie in one window
(read as one slice per array). Then the order of all batches is shuffled with the same generator.
The position in the data is therefore just the optimizer step.

Optimizer step s of an epoch uses the micro-batches plan[s*W*A : (s+1)*W*A] (W ranks, A
accumulation steps); rank r takes those whose plan index is r modulo W, i.e. plan[r::W]. An
epoch's tail that does not fill a whole step is dropped (a different tail each epoch), so every
rank runs the same number of steps.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deltakd_cli.cache.reader import CachedExample
from deltakd_cli.data import TokenizedExample, target_positions
from deltakd_cli.errors import DeltakdError
from deltakd_cli.method.targets import (
    CACHED_STUDENT_TAIL_FIELDS,
    PER_POSITION_FIELDS,
    STUDENT_FIELDS,
    CachedTargets,
)


class ExampleStore(Protocol):
    """What the planner and the dataset need; `cache.reader.CacheReader` is one."""

    @property
    def num_shards(self) -> int: ...

    def shard_lengths(self, shard: int) -> np.ndarray: ...

    def read_examples(self, shard: int, start: int, stop: int) -> list[Any]: ...


class TokenizedStore:
    """Tokenised JSONL examples in memory, as one shard sorted by length (like the cache)."""

    def __init__(self, tokenized: list[TokenizedExample]):
        lengths = np.array([len(t.input_ids) for t in tokenized], dtype=np.int64)
        self.order = np.argsort(lengths, kind="stable")  # stored position -> example index
        self.examples = [
            CachedExample(
                int(index),
                np.asarray(tokenized[index].input_ids, dtype=np.int64),
                np.asarray(tokenized[index].target_mask, dtype=bool),
            )
            for index in self.order
        ]
        self._lengths = np.array(
            [[len(e.input_ids), len(e.target_positions)] for e in self.examples],
            dtype=np.int64,
        ).reshape(-1, 2)

    @property
    def num_shards(self) -> int:
        return 1

    def shard_lengths(self, shard: int) -> np.ndarray:
        return self._lengths

    def read_examples(self, shard: int, start: int, stop: int) -> list[CachedExample]:
        return self.examples[start:stop]


# Rows of how many full batches one window of the length-sorted shard holds: the rows a seed may
# deal into different batches. Wider windows mix more and pad more (docs/benchmarks.md).
WINDOW_BATCHES = 4


@dataclass(frozen=True)
class BatchSpec:
    """One micro-batch: the rows `rows` (ascending) of a shard, all inside [start, stop), the
    slice a reader reads for it."""

    shard: int
    start: int
    stop: int
    num_targets: int
    padded_tokens: int  # rows x longest example
    rows: tuple[int, ...] = ()  # empty: every row of [start, stop)

    @property
    def row_indices(self) -> tuple[int, ...]:
        return self.rows or tuple(range(self.start, self.stop))


def shard_boundaries(
    num_tokens: np.ndarray, batch_size: int | None, max_tokens: int | None, first_cap: int = 0
) -> list[tuple[int, int]]:
    """Contiguous [start, stop) runs over one shard: at most `batch_size` rows and at most
    `max_tokens` padded tokens (rows x longest) each. A positive `first_cap` closes the first
    batch after that many rows (the per-epoch offset)."""
    boundaries = []
    start, longest = 0, 0
    for row, length in enumerate(num_tokens.tolist()):
        rows = row - start + 1
        new_longest = max(longest, length)
        full = (
            (batch_size is not None and rows > batch_size)
            or (max_tokens is not None and rows * new_longest > max_tokens)
            or (first_cap > 0 and start == 0 and rows > first_cap)
        )
        if full and row > start:
            boundaries.append((start, row))
            start, new_longest = row, length
        longest = new_longest
    if start < len(num_tokens):
        boundaries.append((start, len(num_tokens)))
    return boundaries


def batch_specs(
    shard: int, lengths: np.ndarray, boundaries: list[tuple[int, int]]
) -> list[BatchSpec]:
    """The micro-batches [start, stop) of one shard, with their target and padded token counts
    (`lengths`: the shard's [tokens, targets] per example)."""
    num_tokens = lengths[:, 0]
    target_sums = np.concatenate([[0], np.cumsum(lengths[:, 1])])
    return [
        BatchSpec(
            shard=shard,
            start=start,
            stop=stop,
            num_targets=int(target_sums[stop] - target_sums[start]),
            padded_tokens=int((stop - start) * num_tokens[start:stop].max()),
        )
        for start, stop in boundaries
    ]


def window_batches(
    rows: np.ndarray,
    lengths: np.ndarray,
    batch_size: int | None,
    max_tokens: int | None,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """The rows of one window dealt into batches: shuffled, then filled in that order while a
    batch stays within `batch_size` rows and `max_tokens` padded tokens; each batch's rows
    ascending (the store's length order)."""
    shuffled = rows[rng.permutation(len(rows))]
    batches, current, longest = [], [], 0
    for row in shuffled.tolist():
        length = int(lengths[row, 0])
        new_longest = max(longest, length)
        full = (batch_size is not None and len(current) + 1 > batch_size) or (
            max_tokens is not None and (len(current) + 1) * new_longest > max_tokens
        )
        if full and current:
            batches.append(np.sort(np.array(current)))
            current, new_longest = [], length
        current.append(row)
        longest = new_longest
    if current:
        batches.append(np.sort(np.array(current)))
    return batches


def shard_plan(
    shard: int,
    lengths: np.ndarray,
    batch_size: int | None,
    max_tokens: int | None,
    rng: np.random.Generator,
) -> list[BatchSpec]:
    """One shard's micro-batches for one epoch: windows of `WINDOW_BATCHES` full batches of the
    length-sorted rows (the first window cut short by a seeded offset, which moves every later
    window), each dealt into batches by `window_batches`."""
    num_tokens = lengths[:, 0]
    sorted_batches = shard_boundaries(num_tokens, batch_size, max_tokens)
    rows_per_batch = max(1, round(len(num_tokens) / len(sorted_batches)))
    window = WINDOW_BATCHES * rows_per_batch
    offset = int(rng.integers(0, window))
    edges = [0, *range(offset or window, len(num_tokens), window), len(num_tokens)]
    target_counts = lengths[:, 1]
    specs = []
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        if stop <= start:
            continue
        for batch in window_batches(np.arange(start, stop), lengths, batch_size, max_tokens, rng):
            specs.append(
                BatchSpec(
                    shard=shard,
                    start=int(batch[0]),
                    stop=int(batch[-1]) + 1,
                    num_targets=int(target_counts[batch].sum()),
                    padded_tokens=int(len(batch) * num_tokens[batch].max()),
                    rows=tuple(int(r) for r in batch),
                )
            )
    return specs


def epoch_plan(
    shard_lengths: list[np.ndarray],
    epoch: int,
    seed: int,
    batch_size: int | None,
    max_tokens: int | None,
) -> list[BatchSpec]:
    """All micro-batches of one epoch, in the order they are consumed."""
    rng = np.random.default_rng([seed, epoch])
    specs = []
    for shard, lengths in enumerate(shard_lengths):
        if len(lengths) == 0:
            continue
        num_tokens = lengths[:, 0]
        if max_tokens is not None and int(num_tokens.max()) > max_tokens:
            raise DeltakdError(
                f"--max-tokens-per-batch {max_tokens} is smaller than the longest example "
                f"({int(num_tokens.max())} tokens)"
            )
        specs += shard_plan(shard, lengths, batch_size, max_tokens, rng)
    order = rng.permutation(len(specs))
    return [specs[i] for i in order]


def padding_fraction(specs: list[BatchSpec], shard_lengths: list[np.ndarray]) -> float:
    """The share of padded tokens that are padding: 1 - real tokens / (rows x longest)."""
    real = sum(int(shard_lengths[s.shard][list(s.row_indices), 0].sum()) for s in specs)
    padded = sum(s.padded_tokens for s in specs)
    return 1.0 - real / padded if padded else 0.0


def read_batch(store: ExampleStore, spec: BatchSpec) -> list[Any]:
    """The examples of one micro-batch: one read of its slice, then its rows."""
    examples = store.read_examples(spec.shard, spec.start, spec.stop)
    if not spec.rows:
        return examples
    return [examples[row - spec.start] for row in spec.rows]


class RunPlan:
    """The whole run as a function of (seed, epoch): which micro-batches make optimizer step s,
    on every rank. Every rank builds the same plan, so the global number of target tokens of a
    step is known before any forward pass and without communication."""

    def __init__(
        self,
        shard_lengths: list[np.ndarray],
        *,
        seed: int,
        batch_size: int | None,
        max_tokens: int | None,
        world_size: int,
        grad_accum: int,
        epochs: int,
        max_steps: int | None = None,
    ):
        self.shard_lengths = shard_lengths
        self.seed = seed
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.micro_per_step = world_size * grad_accum
        self._plans: dict[int, list[BatchSpec]] = {}
        self._epoch_first_step = [0]  # global step at which epoch e starts (grown lazily)
        if self.steps_in_epoch(0) == 0:
            raise DeltakdError(
                f"the data makes {len(self.plan(0))} micro-batches, fewer than one optimizer "
                f"step needs ({world_size} process(es) x --grad-accum {grad_accum}); "
                "use a smaller --batch-size or --grad-accum"
            )
        if max_steps:
            self.total_steps = max_steps
        else:
            self.total_steps = sum(self.steps_in_epoch(e) for e in range(epochs))

    def plan(self, epoch: int) -> list[BatchSpec]:
        if epoch not in self._plans:
            if len(self._plans) > 4:  # keep memory flat over many epochs
                self._plans.pop(min(self._plans))
            self._plans[epoch] = epoch_plan(
                self.shard_lengths, epoch, self.seed, self.batch_size, self.max_tokens
            )
        return self._plans[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.plan(epoch)) // self.micro_per_step

    def locate(self, step: int) -> tuple[int, int]:
        """Global step -> (epoch, step within the epoch)."""
        while self._epoch_first_step[-1] <= step:
            epoch = len(self._epoch_first_step) - 1
            self._epoch_first_step.append(self._epoch_first_step[-1] + self.steps_in_epoch(epoch))
        epoch = int(np.searchsorted(self._epoch_first_step, step, side="right")) - 1
        return epoch, step - self._epoch_first_step[epoch]

    def step_batches(self, step: int) -> list[BatchSpec]:
        """The W x A micro-batches of a global step, in plan order."""
        epoch, within = self.locate(step)
        first = within * self.micro_per_step
        return self.plan(epoch)[first : first + self.micro_per_step]

    def rank_micro_batches(self, step: int, rank: int) -> list[BatchSpec]:
        """This rank's A micro-batches of a step: plan indices congruent to rank modulo W."""
        return self.step_batches(step)[rank :: self.world_size]

    def step_targets(self, step: int) -> int:
        """Target tokens of the whole optimizer step, summed over ranks and micro-batches."""
        return sum(spec.num_targets for spec in self.step_batches(step))


def evaluation_batches(
    store: ExampleStore, batch_size: int | None, max_tokens: int | None
) -> list[BatchSpec]:
    """Every example of `store` once, in store order, in micro-batches of the training sizes:
    the fixed batches of a held-out evaluation."""
    specs = []
    for shard in range(store.num_shards):
        lengths = store.shard_lengths(shard)
        if len(lengths) == 0:
            continue
        boundaries = shard_boundaries(lengths[:, 0], batch_size, max_tokens)
        specs += batch_specs(shard, lengths, boundaries)
    return specs


def collate(
    examples: list[CachedExample],
    pad_id: int,
    with_student: bool = True,
    with_tail_shift: bool = True,
) -> dict[str, Any]:
    """Examples (with or without cached targets) -> the batch dict of the contract: right-padded
    input ids, targets at the positions of `data.target_positions`, each predicting the next
    token. Without `with_student`, the base student's cached fields are left out; without
    `with_tail_shift`, the tail figures computed with the cache's own student (the mass-matched
    shift and the family's exact tail masses; valid only for that student)."""
    lengths = [len(e.input_ids) for e in examples]
    longest = max(lengths)
    input_ids = np.full((len(examples), longest), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(examples), longest), dtype=np.int64)
    target_batch, target_pos = [], []
    for row, example in enumerate(examples):
        input_ids[row, : lengths[row]] = example.input_ids
        attention_mask[row, : lengths[row]] = 1
        positions = target_positions(example.target_mask)
        target_pos.append(positions)
        target_batch.append(np.full(len(positions), row, dtype=np.int64))
    target_batch_np = np.concatenate(target_batch)
    target_pos_np = np.concatenate(target_pos)
    labels = input_ids[target_batch_np, target_pos_np + 1]
    cached = None
    if examples[0].targets is not None:
        entries: dict[str, torch.Tensor | None] = {}
        for name in PER_POSITION_FIELDS:
            values = [getattr(e.targets, name) for e in examples]
            dropped = (name in STUDENT_FIELDS and not with_student) or (
                name in CACHED_STUDENT_TAIL_FIELDS and not with_tail_shift
            )
            if values[0] is None or dropped:
                entries[name] = None
            else:
                entries[name] = torch.from_numpy(np.concatenate(values))
        if entries["ids"].shape[0] != len(labels):
            raise DeltakdError(
                f"cache entries hold {entries['ids'].shape[0]} target positions where the "
                f"tokens give {len(labels)}: the cache is damaged"
            )
        cached = CachedTargets(**entries)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "target_batch": torch.from_numpy(target_batch_np),
        "target_pos": torch.from_numpy(target_pos_np),
        "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        "cached": cached,
        "example_index": torch.tensor([e.example_index for e in examples], dtype=torch.int64),
        "num_targets": len(labels),
    }


class MicroBatchDataset(Dataset):
    """Map-style: item i is this rank's i-th collated micro-batch from `start_step` on. Each item
    is read from the store when asked for, so memory does not grow with the store."""

    def __init__(
        self,
        store: ExampleStore,
        plan: RunPlan,
        rank: int,
        start_step: int,
        end_step: int,
        pad_id: int,
        with_student: bool = True,
        with_tail_shift: bool = True,
    ):
        self.store = store
        self.plan = plan
        self.rank = rank
        self.start_step = start_step
        self.end_step = end_step
        self.pad_id = pad_id
        self.with_student = with_student
        self.with_tail_shift = with_tail_shift

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.plan.grad_accum

    def spec(self, index: int) -> BatchSpec:
        step = self.start_step + index // self.plan.grad_accum
        return self.plan.rank_micro_batches(step, self.rank)[index % self.plan.grad_accum]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        examples = read_batch(self.store, self.spec(index))
        return collate(examples, self.pad_id, self.with_student, self.with_tail_shift)


def micro_batch_loader(
    dataset: MicroBatchDataset, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader over collated micro-batches (batch_size=None), read ahead by workers."""
    options: dict[str, Any] = {}
    if num_workers > 0:
        options = {"prefetch_factor": 4, "persistent_workers": False}
    return DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_ignore_interrupts if num_workers > 0 else None,
        **options,
    )


def _ignore_interrupts(_worker_id: int) -> None:
    """Workers leave Ctrl-C to the main process, which stops them (no worker tracebacks)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
