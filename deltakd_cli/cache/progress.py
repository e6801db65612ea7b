"""What a shard writer has committed (its progress.json), with the sha256 of every chunk file it
vouches for, and the check a resume runs before it trusts it.

progress.json holds the committed counts (batches, examples, tokens, positions) and, per array,
`{"complete": N, "chain": HEX, "open": HEX or null}`: N chunks are full, HEX chains their file
digests in order (chain_{i+1} = sha256(chain_i + sha256(file_i)), chain_0 = ""), and `open` is the
sha256 of the committed rows of the last, partly filled chunk (their values, not the file: a run
killed after writing more rows rewrites that file). A full chunk is never written again, so the
chain only grows; the file stays a few hundred bytes however large the shard.

On resume every chunk the counts cover is read back: a chunk that is missing or whose digest is
not the recorded one sends the shard back to the last batch whose rows all lie before it, and
those batches are computed again."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from zarr.core.buffer import Buffer
from zarr.storage import WrapperStore

from deltakd_cli.cache.location import Location
from deltakd_cli.cache.schema import expected_rows

COUNTS = ("batches", "examples", "tokens", "positions")


class DigestingStore(WrapperStore):
    """A zarr store that remembers the sha256 of every object it writes (the writer's chunks),
    so progress.json can vouch for them without reading them back."""

    def __init__(self, store: Any, digests: dict[str, str] | None = None):
        super().__init__(store)
        self.digests: dict[str, str] = {} if digests is None else digests

    def _with_store(self, store: Any) -> DigestingStore:
        return type(self)(store, self.digests)

    async def set(self, key: str, value: Buffer) -> None:
        self.digests[key] = hashlib.sha256(value.to_bytes()).hexdigest()
        await self._store.set(key, value)

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        for key, value in values:
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        self.digests.pop(key, None)
        await self._store.delete(key)


def chunk_key(name: str, index: int, ndim: int) -> str:
    """The file of chunk `index` (along rows) of an array: zarr v3's default key encoding, with
    one chunk across every trailing dimension."""
    return "/".join([name, "c", str(index), *["0"] * (ndim - 1)])


def _chained(chain: str, digest: str) -> str:
    return hashlib.sha256((chain + digest).encode()).hexdigest()


def rows_digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def chunk_states(
    specs: dict[str, tuple],
    counts: dict[str, int],
    previous: dict[str, Any],
    digest_of: Callable[[str], str],
    arrays: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Each array's chunk record at `counts`, extending `previous` (the last commit's records)
    with the digests of the chunks filled since; `digest_of(key)` gives a chunk file's sha256."""
    states = {}
    for name, (_dtype, trailing, chunk_rows, _shuffle) in specs.items():
        rows = expected_rows(name, counts)
        state = previous.get(name) or {"complete": 0, "chain": "", "open": None}
        complete, chain = state["complete"], state["chain"]
        ndim = 1 + len(trailing)
        while complete < rows // chunk_rows:
            chain = _chained(chain, digest_of(chunk_key(name, complete, ndim)))
            complete += 1
        start = complete * chunk_rows
        opened = rows_digest(arrays[name][start:rows]) if rows > start else None
        states[name] = {"complete": complete, "chain": chain, "open": opened}
    return states


def verified_counts(
    location: Location,
    group_path: str,
    group: Any,
    specs: dict[str, tuple],
    committed: dict[str, Any],
    batch_sizes: list[int],
) -> tuple[dict[str, Any], list[str]]:
    """The part of a committed shard whose chunk files are all there with their recorded
    digests: (counts at the last whole batch before the first bad chunk, and what was found
    wrong, one entry per array). A progress file without digests (an earlier deltakd) is
    checked for missing chunks only."""
    records = committed.get("chunks") or {}
    first_bad: dict[str, int] = {}
    problems = []
    for name, (_dtype, trailing, chunk_rows, _shuffle) in specs.items():
        rows = expected_rows(name, committed)
        record = records.get(name)
        chain = ""
        for index in range(-(-rows // chunk_rows)):
            key = chunk_key(name, index, 1 + len(trailing))
            try:
                content = location.read_bytes(f"{group_path}/{key}")
            except FileNotFoundError:
                first_bad[name] = index * chunk_rows
                problems.append(f"{key} is missing")
                break
            if record is None:
                continue
            if index < record["complete"]:
                chain = _chained(chain, hashlib.sha256(content).hexdigest())
                if index + 1 == record["complete"] and chain != record["chain"]:
                    first_bad[name] = 0  # the chain does not say which: all of them again
                    problems.append(f"{name}'s chunks changed since they were written")
                continue
            start = index * chunk_rows
            if not _rows_match(group[name], start, rows, record["open"]):
                first_bad[name] = start
                problems.append(f"{key} changed since it was written")
    if not first_bad:
        return committed, []
    examples = _examples_before(group, committed, first_bad)
    done, kept = 0, 0
    for size in batch_sizes:
        if kept + size > examples:
            break
        kept += size
        done += 1
    token_offsets = group["token_offsets"]
    target_offsets = group["target_offsets"]
    counts = {
        "batches": done,
        "examples": kept,
        "tokens": int(token_offsets[kept]) if kept else 0,
        "positions": int(target_offsets[kept]) if kept else 0,
    }
    return counts, problems


def _rows_match(array: Any, start: int, stop: int, digest: str | None) -> bool:
    try:
        return rows_digest(array[start:stop]) == digest
    except Exception:  # the chunk does not decode (blosc raises several types): not sound
        return False


def _examples_before(group: Any, committed: dict[str, Any], first_bad: dict[str, int]) -> int:
    """How many leading examples have every row in chunks that are sound."""
    examples = committed["examples"]
    for name in ("token_offsets", "target_offsets"):  # row e + 1 ends example e
        if name in first_bad:
            examples = min(examples, max(first_bad[name] - 1, 0))
    if "example_index" in first_bad:
        examples = min(examples, first_bad["example_index"])
    if examples == 0:
        return 0
    token_ends = group["token_offsets"][1 : examples + 1]
    target_ends = group["target_offsets"][1 : examples + 1]
    for name, row in first_bad.items():
        if name in ("input_ids", "target_mask"):
            examples = min(examples, int(np.searchsorted(token_ends, row, side="right")))
        elif name not in ("token_offsets", "target_offsets", "example_index"):
            examples = min(examples, int(np.searchsorted(target_ends, row, side="right")))
    return examples
