"""The shard writer: one per rank, resumable, write-behind (a background thread writes the
zarr chunks while the next batch runs)."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from deltakd_cli import data, faults
from deltakd_cli.cache.location import Location
from deltakd_cli.cache.progress import DigestingStore, chunk_states, verified_counts
from deltakd_cli.cache.schema import (
    ZARR_POSITION_CHUNK,
    BatchRecord,
    codec,
    expected_rows,
    shard_name,
)
from deltakd_cli.console import info
from deltakd_cli.errors import DeltakdError
from deltakd_cli.outputs import (
    failed_write,
    write_error,
    writing,
)

# Progress is committed at least this often (seconds), so a slow run loses little when killed.
FLUSH_SECONDS = float(os.environ.get("DELTAKD_FLUSH_SECONDS", "60"))


class ShardWriter:
    """Appends batch records to one rank's zarr shard behind the compute (a writer thread).

    Records are buffered and flushed at least a chunk of positions at a time; after each flush the
    progress file is replaced atomically. Resume truncates every array to the committed sizes and
    continues, so a resumed run ends with the same arrays as an uninterrupted one."""

    def __init__(
        self,
        location: Location,
        rank: int,
        world: int,
        specs: dict[str, tuple],
        batch_sizes: list[int],
        queue_depth: int = 4,
    ):
        self.location = location
        self.batch_sizes = batch_sizes  # examples per planned batch: a resume's rollback unit
        self.name = shard_name(rank, world)
        self.group_path = f"shards/{self.name}.zarr"
        self.progress_path = f"shards/{self.name}.progress.json"
        self.specs = specs
        with writing(self.location.join(self.group_path)):
            self.committed = self._open_or_create()
        self.pending: list[BatchRecord] = []
        self.pending_positions = 0
        self.last_flush = time.monotonic()
        self.error: BaseException | None = None
        self.error_bytes: int | None = None  # what the failed flush was writing
        self.queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self.thread = threading.Thread(target=self._drain, name=f"{self.name}-writer", daemon=True)
        self.thread.start()

    # -- set-up and resume
    def _open_or_create(self) -> dict[str, Any]:
        empty = {"batches": 0, "examples": 0, "tokens": 0, "positions": 0}
        if self.location.exists(self.progress_path):
            committed = json.loads(self.location.read_text(self.progress_path))
            self._remove_partial_files()
            self.group = zarr.open_group(self._store(), mode="r+")
            self._open_arrays()
            # Trust nothing progress.json says without reading it back: a chunk deleted or
            # changed since is computed again (from the last batch before it).
            counts, problems = verified_counts(
                self.location, self.group_path, self.group, self.specs, committed,
                self.batch_sizes,
            )  # fmt: skip
            self._truncate(counts)
            if problems:
                info(
                    f"[yellow]note:[/yellow] {self.name}: {'; '.join(problems)}: computing "
                    f"again from batch {counts['batches'] + 1} (progress.json had "
                    f"{committed['batches']} batches)"
                )
            if problems or "chunks" not in committed:
                committed = {**counts, "chunks": self._chunk_states(counts, {})}
                self.location.write_text(self.progress_path, json.dumps(committed))
            return committed
        self.location.remove(self.group_path)
        self.group = zarr.open_group(self._store(), mode="w")
        for name, (dtype, trailing, chunk_rows, shuffle) in self.specs.items():
            self.group.create_array(
                name,
                shape=(0, *trailing),
                chunks=(chunk_rows, *trailing),
                dtype=dtype,
                compressors=[codec(dtype, shuffle)],
                fill_value=0,
            )
        self._open_arrays()
        for name in ("token_offsets", "target_offsets"):
            self._append(name, np.zeros(1, dtype=np.int64))
        empty["chunks"] = self._chunk_states(empty, {})
        self.location.write_text(self.progress_path, json.dumps(empty))
        return empty

    def _store(self) -> DigestingStore:
        self.digests: dict[str, str] = {}
        return DigestingStore(self.location.zarr_store(self.group_path), self.digests)

    def _digest_of(self, key: str) -> str:
        """A chunk file's sha256: as this process wrote it, else read back."""
        if key not in self.digests:
            content = self.location.read_bytes(f"{self.group_path}/{key}")
            self.digests[key] = hashlib.sha256(content).hexdigest()
        return self.digests[key]

    def _chunk_states(self, counts: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
        return chunk_states(self.specs, counts, previous, self._digest_of, self.arrays)

    def _open_arrays(self) -> None:
        # Every chunk is written, zeros included: a chunk file that is missing later means the
        # store was damaged (zarr would silently read it back as zeros); see check_structure.
        config = {"write_empty_chunks": True}
        self.arrays = {name: self.group[name].with_config(config) for name in self.specs}

    def _remove_partial_files(self) -> None:
        """A kill during a local write can leave a store's temp file behind; it is not data."""
        if self.location.url:
            return
        for path in Path(self.location.join(self.group_path)).rglob("*.partial"):
            path.unlink()

    def _truncate(self, committed: dict[str, int]) -> None:
        for name in self.specs:
            array = self.arrays[name]
            rows = expected_rows(name, committed)
            if array.shape[0] != rows:
                array.resize((rows, *array.shape[1:]))

    def _append(self, name: str, values: np.ndarray) -> None:
        faults.point(f"append {name}")
        array = self.arrays[name]
        start = array.shape[0]
        array.resize((start + len(values), *array.shape[1:]))
        array[start:] = values

    # -- the compute side
    def put(self, record: BatchRecord) -> None:
        """Queue one batch for writing (blocks while the writer is `queue_depth` batches behind,
        and raises as soon as the writer has failed, instead of waiting on it for ever)."""
        self._raise_if_failed()
        self._hand_over(record)

    def close(self) -> dict[str, int]:
        """Flush everything, stop the thread, and return the committed counts."""
        self._hand_over(None)
        self.thread.join()
        self._raise_if_failed()
        return self.committed

    def _hand_over(self, item: BatchRecord | None) -> None:
        while True:
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                self._raise_if_failed()
                if not self.thread.is_alive():
                    raise DeltakdError(f"the writer of shard {self.name} stopped") from None

    def _raise_if_failed(self) -> None:
        if self.error is None:
            return
        if isinstance(self.error, DeltakdError):
            raise self.error
        where = self.location.join(self.group_path)
        cause = failed_write(self.error, where, self.error_bytes)
        if cause is not None:
            raise write_error(cause, where, self.error_bytes)
        raise DeltakdError(f"writing shard {where} failed: {self.error}")

    # -- the writer thread
    def _drain(self) -> None:
        try:
            while True:
                record = self.queue.get()
                if record is None:
                    self._flush()
                    return
                self.pending.append(record)
                self.pending_positions += len(record.positions["ids"])
                overdue = time.monotonic() - self.last_flush >= FLUSH_SECONDS
                if self.pending_positions >= ZARR_POSITION_CHUNK or overdue:
                    self._flush()
        except BaseException as error:  # surfaced on the compute side by put()/close()
            self.error = error
            # Unblock a compute side waiting on a full queue: it sees the error next.
            while not self.queue.empty():
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break

    def _flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.pending:
            return
        records, self.pending, self.pending_positions = self.pending, [], 0
        self.error_bytes = sum(
            sum(ids.nbytes for ids in r.input_ids) + sum(v.nbytes for v in r.positions.values())
            for r in records
        )
        committed = dict(self.committed)
        input_ids = [ids for record in records for ids in record.input_ids]
        masks = [mask for record in records for mask in record.target_mask]
        lengths = np.array([len(ids) for ids in input_ids], dtype=np.int64)
        targets = np.array([len(data.target_positions(mask)) for mask in masks], dtype=np.int64)
        self._append("input_ids", np.concatenate(input_ids))
        self._append("target_mask", np.concatenate(masks).astype(np.uint8))
        self._append("token_offsets", committed["tokens"] + np.cumsum(lengths))
        self._append("example_index", np.concatenate([r.example_index for r in records]))
        self._append("target_offsets", committed["positions"] + np.cumsum(targets))
        for name in self.specs:
            if name in records[0].positions:
                self._append(name, np.concatenate([r.positions[name] for r in records]))
        committed["batches"] += len(records)
        committed["examples"] += len(input_ids)
        committed["tokens"] += int(lengths.sum())
        committed["positions"] += int(targets.sum())
        committed["chunks"] = self._chunk_states(committed, self.committed.get("chunks") or {})
        # The arrays may hold more rows than the progress file says (a kill right here):
        # resume truncates them back to the committed counts.
        self.location.write_text(self.progress_path, json.dumps(committed))
        self.committed = committed
        self.error_bytes = None
