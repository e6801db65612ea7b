"""The reader: `CacheReader` checks a cache (format, checksums, the grid: the grid's one reader) and
reads ranges of examples."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import zarr
from rich.markup import escape

from deltakd_cli import data
from deltakd_cli.cache.location import (
    SETTINGS_FILE,
    VOCABULARY_FILE,
    Location,
    is_storage_error,
)
from deltakd_cli.cache.manifest import CacheRecord, read_manifest, shard_checksums
from deltakd_cli.cache.schema import (
    decode_positions,
    expected_rows,
)
from deltakd_cli.console import info
from deltakd_cli.errors import DeltakdError, one_line
from deltakd_cli.method.targets import FIELD_KIND, PER_POSITION_FIELDS, CachedTargets, GridPoint

# A network or storage error while reading is tried this many times in all, waiting
# READ_BACKOFF_SECONDS, then twice that, ... in between: a blip on an object store must not stop
# a run, and is never taken for a damaged cache (rebuilding a 7B cache costs GPU-days).
READ_ATTEMPTS = 4
READ_BACKOFF_SECONDS = 2.0

Result = TypeVar("Result")


@dataclass
class CachedExample:
    """One example as stored: its tokens and, from a cache, the entries of its target positions
    (None for rows that are only tokenised, as `finetune` trains on)."""

    example_index: int
    input_ids: np.ndarray
    target_mask: np.ndarray  # bool per token: the token is a target
    targets: CachedTargets | None = None  # numpy arrays, one row per target position

    @property
    def target_positions(self) -> np.ndarray:
        return data.target_positions(self.target_mask)


class CacheReader:
    """Reads a complete cache; memory stays at what a caller asks for (per-range reads)."""

    def __init__(self, path: str, record: CacheRecord | None = None):
        """`record`: a manifest not yet written (cache-teachers checks the cache with the readers'
        own check_structure before it writes the manifest that makes the cache complete)."""
        self.location = Location(str(path))
        if not self.location.exists():
            raise DeltakdError(f"cache not found: {path}")
        record = record or read_manifest(self.location)
        if record is None:
            unfinished = self.location.exists(SETTINGS_FILE)
            state = "an unfinished cache" if unfinished else "not a cache"
            raise DeltakdError(f"{path}: {state} (no manifest.json); run cache-teachers to finish")
        self.record = record
        self.path = str(path)
        self.shard_names = record.shard_names
        self._groups: dict[int, Any] = {}  # open zarr groups, valid in process _pid only
        self._pid = os.getpid()
        self.skip_fields: tuple[str, ...] = ()  # per-position arrays a reader leaves unread
        self._offsets: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def manifest(self) -> dict[str, Any]:
        """The record as manifest.json's JSON in this deltakd's names (for tools and tests;
        deltakd's own code reads `record`)."""
        return {**self.record.to_json(), "manifest_sha256": self.record.manifest_sha256}

    @property
    def num_shards(self) -> int:
        return len(self.shard_names)

    @property
    def top_k(self) -> int:
        return self.record.top_k

    @property
    def vocab_size(self) -> int:
        return self.record.vocab_size

    @property
    def has_student(self) -> bool:
        return self.record.has_student

    @property
    def grid_points(self) -> tuple[GridPoint, ...]:
        """The (gamma, alpha) grid points in column order (() without a grid)."""
        return self.record.grid_points

    @property
    def tail_samples(self) -> int:
        """Draws per position of the sampled tail (0: none; formats 3 and 4 have none)."""
        return self.record.tail_samples

    @property
    def temperature(self) -> float:
        """The temperature the cache's distributions (and draws) are at (1 before format 5)."""
        return self.record.temperature

    def vocabulary(self) -> list[str | None]:
        """The token string of every id the cache uses (checked against the manifest)."""
        try:
            tokens = json.loads(self.location.read_text(VOCABULARY_FILE))
        except (FileNotFoundError, json.JSONDecodeError):
            raise DeltakdError(f"{self.path}: {VOCABULARY_FILE} is missing or damaged") from None
        from deltakd_cli.vocab import vocabulary_sha256

        if vocabulary_sha256(tokens) != self.record.vocabulary_sha256:
            raise DeltakdError(f"{self.path}: {VOCABULARY_FILE} does not match the manifest")
        return tokens

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen zarr groups lazily
        state = dict(self.__dict__)
        state["_groups"] = {}
        return state

    def group(self, shard: int) -> Any:
        """A shard's zarr group, opened in this process: a forked DataLoader worker opens its
        own (the parent's store may hold an async client that does not survive a fork)."""
        if self._pid != os.getpid():
            self._groups, self._pid = {}, os.getpid()
        if shard not in self._groups:
            store = self.location.zarr_store(f"shards/{self.shard_names[shard]}.zarr", True)
            try:
                self._groups[shard] = zarr.open_group(store, mode="r")
            except Exception as error:
                if is_storage_error(error):
                    raise  # retried by the caller, and named as a storage error
                raise DeltakdError(
                    f"{self.path}: shard {self.shard_names[shard]}: {error}"
                ) from None
        return self._groups[shard]

    def retrying(self, shard: int, read: Callable[[], Result]) -> Result:
        """`read()`, tried again with backoff after a network or storage error (the shard's
        group reopened), then one line saying so; anything else is the caller's."""
        for attempt in range(READ_ATTEMPTS):
            try:
                return read()
            except DeltakdError:
                raise
            except Exception as error:
                if not is_storage_error(error):
                    raise
                text = f"{type(error).__name__}: {one_line(error, 200)}"
                where = f"{self.path}: shard {self.shard_names[shard]}"
                if attempt + 1 == READ_ATTEMPTS:
                    raise DeltakdError(
                        f"{where}: reading failed {READ_ATTEMPTS} times with a network or "
                        f"storage error ({text}); the cache is not known to be damaged: check "
                        "the connection or the store, then rerun"
                    ) from None
                wait = READ_BACKOFF_SECONDS * 2**attempt
                note = f"{escape(where)}: {escape(text)}; retrying in {wait:g}s"
                info(f"[yellow]note:[/yellow] {note}")
                time.sleep(wait)
                self._groups.pop(shard, None)
        raise AssertionError("unreachable")

    def offsets(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(token_offsets [E+1], target_offsets [E+1]) of a shard."""
        if shard not in self._offsets:
            group = self.group(shard)
            self._offsets[shard] = (group["token_offsets"][:], group["target_offsets"][:])
        return self._offsets[shard]

    def shard_lengths(self, shard: int) -> np.ndarray:
        """[E, 2] int64: (num_tokens, num_targets) of each example in stored order."""
        token_offsets, target_offsets = self.offsets(shard)
        return np.stack([np.diff(token_offsets), np.diff(target_offsets)], axis=1)

    def check_structure(self) -> None:
        """Cheap checks that need no checksum pass (they also run with --no-verify-cache):
        every array is there with the manifest's dtype, rows and chunk files (zarr would read a
        missing chunk back as zeros), and the offsets agree with each other. Kept ids are
        checked against the vocabulary as batches are read."""
        dtypes = self.record.dtypes
        trailing = {"ids": (self.top_k,), "logprobs": (self.top_k,), "scalar": ()}
        trailing["grid"] = (len(self.grid_points),)
        for kind in ("sample_ids", "counts", "sample_logprobs"):
            trailing[kind] = (self.tail_samples,)
        total_examples = 0
        for shard, entry in enumerate(self.record.shards):
            self.retrying(shard, partial(self._check_shard, shard, entry, dtypes, trailing))
            total_examples += entry["examples"]
        if total_examples != self.record.counts["examples"]:
            raise DeltakdError(
                f"{self.path}: the shards hold {total_examples} examples, the "
                f"manifest {self.record.counts['examples']}; rebuild the cache"
            )

    def _check_shard(
        self, shard: int, entry: dict[str, Any], dtypes: dict[str, str], trailing_of_kind: dict
    ) -> None:
        """check_structure on one shard: its arrays, their chunk files, its offsets."""
        where = f"{self.path}: shard {entry['name']}"
        group = self.group(shard)
        for name, dtype in dtypes.items():
            if name not in group:
                raise DeltakdError(f"{where}: the array {name} is missing; rebuild the cache")
            array = group[name]
            rows = expected_rows(name, entry)
            trailing = trailing_of_kind[FIELD_KIND.get(name, "scalar")]
            if array.shape != (rows, *trailing) or str(array.dtype) != dtype:
                raise DeltakdError(
                    f"{where}: {name} has shape {array.shape} and dtype {array.dtype}, the "
                    f"manifest says {(rows, *trailing)} and {dtype}; rebuild the cache"
                )
            self._check_chunks(shard, name, array)
        token_offsets, target_offsets = self.offsets(shard)
        mask = group["target_mask"][:].astype(np.int64)
        running = np.concatenate([[0], np.cumsum(mask)])
        starts, ends = token_offsets[:-1], token_offsets[1:]
        consistent = (
            token_offsets[0] == 0
            and target_offsets[0] == 0
            and (ends - starts >= 2).all()
            and token_offsets[-1] == entry["tokens"] == len(mask)
            and target_offsets[-1] == entry["positions"]
            and (mask[starts] == 0).all()  # nothing predicts an example's first token
            and (np.diff(target_offsets) == running[ends] - running[starts + 1]).all()
        )
        if not consistent:
            raise DeltakdError(f"{where}: its offsets do not add up; rebuild the cache")

    def _check_chunks(self, shard: int, name: str, array: Any) -> None:
        """One chunk file per chunk of rows (the writer writes every chunk)."""
        if array.shape[0] == 0:
            return
        chunk_files = self.location.files_under(f"shards/{self.shard_names[shard]}.zarr/{name}")
        present = sum(1 for relative in chunk_files if relative.startswith("c/"))
        wanted = -(-array.shape[0] // array.chunks[0])
        if present != wanted:
            raise DeltakdError(
                f"{self.path}: shard {self.shard_names[shard]}: {name} has {present} of its "
                f"{wanted} chunk files; the cache is damaged, rebuild it"
            )

    def read_examples(self, shard: int, start: int, stop: int) -> list[CachedExample]:
        """Examples [start, stop) of a shard, with one contiguous read per array. A chunk that
        does not decode (a damaged file read with --no-verify-cache) is one line naming it."""
        try:
            return self.retrying(shard, lambda: self._read_examples(shard, start, stop))
        except DeltakdError:
            raise
        except Exception as error:  # a damaged chunk: blosc/zstd raise RuntimeError,
            # ValueError, even SystemError, depending on which bytes changed
            text = f"{type(error).__name__}: {one_line(error, 200)}"
            raise DeltakdError(
                f"{self.path}: shard {self.shard_names[shard]}: a chunk does not decode ({text}); "
                f"the cache is damaged: check it with deltakd inspect {self.path} --verify, "
                "then rebuild it"
            ) from None

    def _read_examples(self, shard: int, start: int, stop: int) -> list[CachedExample]:
        group = self.group(shard)
        token_offsets, target_offsets = self.offsets(shard)
        token_lo, token_hi = int(token_offsets[start]), int(token_offsets[stop])
        target_lo, target_hi = int(target_offsets[start]), int(target_offsets[stop])
        tokens = group["input_ids"][token_lo:token_hi].astype(np.int64)
        masks = group["target_mask"][token_lo:token_hi].astype(bool)
        example_index = group["example_index"][start:stop]
        per_position: dict[str, np.ndarray] = {}
        for name in PER_POSITION_FIELDS:
            if name in group and name not in self.skip_fields:
                per_position[name] = decode_positions(name, group[name][target_lo:target_hi])
        for name in ("ids", "sample_ids"):
            ids = per_position.get(name)
            if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
                raise DeltakdError(
                    f"{self.path}: shard {self.shard_names[shard]} holds token ids outside the "
                    f"vocabulary of {self.vocab_size}; the cache is damaged, rebuild it"
                )
        examples = []
        for offset, row in enumerate(range(start, stop)):
            tokens_at = slice(
                int(token_offsets[row]) - token_lo, int(token_offsets[row + 1]) - token_lo
            )
            targets_at = slice(
                int(target_offsets[row]) - target_lo, int(target_offsets[row + 1]) - target_lo
            )
            entries = {name: values[targets_at] for name, values in per_position.items()}
            examples.append(
                CachedExample(
                    example_index=int(example_index[offset]),
                    input_ids=tokens[tokens_at],
                    target_mask=masks[tokens_at],
                    targets=CachedTargets(**entries),
                )
            )
        return examples

    def find_example(self, example_index: int) -> CachedExample:
        """The example with a given global index (its row number in the data file)."""
        for shard in range(self.num_shards):
            indices = self.group(shard)["example_index"][:]
            hits = np.nonzero(indices == example_index)[0]
            if len(hits):
                row = int(hits[0])
                return self.read_examples(shard, row, row + 1)[0]
        total = int(self.record.counts["examples"])
        raise DeltakdError(f"no example {example_index} in this cache (it has {total} examples)")

    def verify(self) -> list[str]:
        """Names of shards whose bytes no longer match the manifest's checksums."""
        damaged = []
        for index, shard in enumerate(self.record.shards):
            group_path = f"shards/{shard['name']}.zarr"
            if not self.location.exists(group_path):
                damaged.append(f"{shard['name']} (missing)")
                continue
            digest = self.retrying(index, partial(shard_checksums, self.location, group_path))
            if digest["sha256"] != shard["sha256"]:
                damaged.append(shard["name"])
        return damaged
