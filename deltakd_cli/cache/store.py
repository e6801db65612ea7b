"""The teacher cache on disk: the shard writer (one per rank, resumable, write-behind), the
manifest and its checksums, and the reader. With cache/schema.py, the only code that touches
zarr.

Layout of a cache directory (or fsspec URL) `CACHE/`:

    CACHE/settings.json               settings of the run that writes it (present from the start)
    CACHE/shards/shard-RRRRR-of-WWWWW.zarr/      one zarr v3 group per writer (rank)
    CACHE/shards/shard-RRRRR-of-WWWWW.progress.json   what that writer has committed
    CACHE/manifest.json               written last, atomically: a cache is complete iff it exists

docs/cache-format.md specifies every array (cache/schema.py holds the same in code).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from deltakd_cli import data, faults
from deltakd_cli.cache.schema import (
    FORMAT_VERSION,
    READABLE_FORMAT_VERSIONS,
    SHARD_NAME,
    ZARR_POSITION_CHUNK,
    BatchRecord,
    codec,
    decode_positions,
    expected_rows,
    shard_name,
)
from deltakd_cli.errors import DeltakdError
from deltakd_cli.outputs import (
    LOCK,
    MARKER,
    PARTIAL_SUFFIX,
    atomic_write_text,
    foreign_names,
    is_url,
    local_path,
    marker_text,
    parse_marker,
    refuse_foreign,
    write_error,
    writing,
)
from deltakd_cli.targets import FIELD_KIND, PER_POSITION_FIELDS, CachedTargets, GridPoint

# Progress is committed at least this often (seconds), so a slow run loses little when killed.
FLUSH_SECONDS = float(os.environ.get("DELTAKD_FLUSH_SECONDS", "60"))

SETTINGS_FILE = "settings.json"  # the settings of the run writing the cache (resume compares)
VOCABULARY_FILE = "vocabulary.json"  # the token string of every id the cache uses


# ----------------------------------------------------------------------------- locations


class Location:
    """A directory on local disk or behind fsspec, with the few file operations the cache needs.
    Local writes go through a temp file and a rename, so a reader never sees half a file; every
    name is checked to stay inside the directory."""

    def __init__(self, root: str):
        self.url = is_url(root)
        self.root = (root if self.url else local_path(root)).rstrip("/") or "/"
        if self.url:
            try:
                import fsspec
            except ImportError:
                raise DeltakdError(
                    f"{root}: URLs need fsspec (pip install fsspec) and the scheme's backend "
                    "(e.g. pip install s3fs)"
                ) from None
            try:
                self.fs, self.fs_root = fsspec.core.url_to_fs(root)
            except (ImportError, ValueError) as error:
                raise DeltakdError(f"{root}: cannot open this URL ({error})") from None

    def join(self, *parts: str) -> str:
        for part in parts:
            if part.startswith("/") or ".." in part.split("/") or "\\" in part:
                raise DeltakdError(f"{self.root}: refusing the path {part!r} (outside the cache)")
        return "/".join([self.root, *parts])

    def _path(self, relative: str) -> str:
        return f"{self.fs_root.rstrip('/')}/{relative}" if self.url else self.join(relative)

    def exists(self, relative: str = "") -> bool:
        if self.url:
            return self.fs.exists(self._path(relative) if relative else self.fs_root)
        return Path(self.join(relative) if relative else self.root).exists()

    def read_text(self, relative: str) -> str:
        if self.url:
            with self.fs.open(self._path(relative), "r") as handle:
                return handle.read()
        return Path(self.join(relative)).read_text()

    def write_text(self, relative: str, text: str) -> None:
        if self.url:
            with writing(self.join(relative), len(text)):
                self.fs.makedirs(self._path(relative).rsplit("/", 1)[0], exist_ok=True)
                with self.fs.open(self._path(relative), "w") as handle:
                    handle.write(text)
            return
        atomic_write_text(self.join(relative), text)

    def remove(self, relative: str) -> None:
        if self.url:
            if self.fs.exists(self._path(relative)):
                self.fs.rm(self._path(relative), recursive=True)
            return
        import shutil

        target = Path(self.join(relative))
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()

    def list(self, relative: str = "") -> list[str]:
        """Names directly under `relative` (empty when it does not exist)."""
        if self.url:
            path = self._path(relative) if relative else self.fs_root
            if not self.fs.exists(path):
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))
        target = Path(self.join(relative) if relative else self.root)
        return sorted(p.name for p in target.iterdir()) if target.is_dir() else []

    def files_under(self, relative: str) -> list[str]:
        """Every file below `relative`, as paths relative to it, sorted."""
        if self.url:
            base = self._path(relative)
            found = self.fs.find(base)
            return sorted(p[len(base.rstrip("/")) + 1 :] for p in found)
        base = Path(self.join(relative))
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())

    def read_bytes(self, relative: str) -> bytes:
        if self.url:
            with self.fs.open(self._path(relative), "rb") as handle:
                return handle.read()
        return Path(self.join(relative)).read_bytes()

    def zarr_store(self, relative: str, read_only: bool = False) -> Any:
        if self.url:
            return zarr.storage.FsspecStore.from_url(self.join(relative), read_only=read_only)
        return zarr.storage.LocalStore(self.join(relative), read_only=read_only)


# ----------------------------------------------------------------------------- writer


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
        queue_depth: int = 4,
    ):
        self.location = location
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
    def _open_or_create(self) -> dict[str, int]:
        empty = {"batches": 0, "examples": 0, "tokens": 0, "positions": 0}
        if self.location.exists(self.progress_path):
            committed = json.loads(self.location.read_text(self.progress_path))
            self._remove_partial_files()
            self.group = zarr.open_group(self.location.zarr_store(self.group_path), mode="r+")
            self._open_arrays()
            self._truncate(committed)
            return committed
        self.location.remove(self.group_path)
        self.group = zarr.open_group(self.location.zarr_store(self.group_path), mode="w")
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
        self.location.write_text(self.progress_path, json.dumps(empty))
        return empty

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
        if isinstance(self.error, OSError):
            raise write_error(self.error, where, self.error_bytes)
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
        # The arrays may hold more rows than the progress file says (a kill right here):
        # resume truncates them back to the committed counts.
        self.location.write_text(self.progress_path, json.dumps(committed))
        self.committed = committed
        self.error_bytes = None


# ----------------------------------------------------------------------------- manifest


def shard_checksums(location: Location, group_path: str) -> dict[str, Any]:
    """sha256 over every file of a shard (relative path and bytes, in sorted order)."""
    digest = hashlib.sha256()
    total = 0
    by_array: dict[str, int] = {}
    for relative in location.files_under(group_path):
        content = location.read_bytes(f"{group_path}/{relative}")
        digest.update(relative.encode() + b"\0" + hashlib.sha256(content).digest())
        total += len(content)
        if "/" in relative:  # files of an array live under its folder; the rest is group metadata
            array = relative.split("/", 1)[0]
            by_array[array] = by_array.get(array, 0) + len(content)
    return {"sha256": digest.hexdigest(), "bytes": total, "array_bytes": by_array}


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, its own checksum field left out."""
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_manifest(location: Location, manifest: dict[str, Any]) -> None:
    """Written last and atomically: a cache is complete iff its manifest exists. The manifest
    carries its own checksum, so an edit (of k, alpha, a shard name...) is caught on read."""
    manifest = {**manifest, "manifest_sha256": manifest_checksum(manifest)}
    location.write_text("manifest.json", json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(location: Location) -> dict[str, Any] | None:
    """The manifest, checked against its own checksum and for well-formed shard names."""
    if not location.exists("manifest.json"):
        return None
    damaged = f"{location.root}: manifest.json is damaged"
    try:
        manifest = json.loads(location.read_text("manifest.json"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DeltakdError(f"{damaged} (not valid JSON); rebuild the cache") from None
    if not isinstance(manifest, dict):
        raise DeltakdError(f"{damaged} (not a JSON object); rebuild the cache")
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise DeltakdError(
            f"{location.root}: cache format {manifest.get('format_version')} is not supported "
            f"(this deltakd reads formats {', '.join(map(str, READABLE_FORMAT_VERSIONS))}, "
            f"writes {FORMAT_VERSION}); rebuild it with cache-teachers"
        )
    if manifest.get("manifest_sha256") != manifest_checksum(manifest):
        raise DeltakdError(
            f"{damaged}: it was changed after it was written (its checksum does not match); "
            "rebuild the cache with cache-teachers"
        )
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DeltakdError(f"{damaged} (no shards listed)")
    for shard in shards:
        name = shard.get("name") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not SHARD_NAME.match(name):
            raise DeltakdError(f"{damaged}: {name!r} is not a shard name")
    return manifest


def read_run_state(location: Location) -> dict[str, Any] | None:
    """The settings record of the run writing (or that wrote) the cache; None if unreadable."""
    if not location.exists(SETTINGS_FILE):
        return None
    try:
        state = json.loads(location.read_text(SETTINGS_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return state if isinstance(state, dict) else None


# What cache-teachers writes at the top of a cache: all that --overwrite removes.
OWN_NAMES = ("manifest.json", SETTINGS_FILE, VOCABULARY_FILE, "shards", MARKER)


def _read_marker(location: Location) -> dict[str, Any] | None:
    if not location.exists(MARKER):
        return None
    try:
        return parse_marker(location.read_text(MARKER))
    except UnicodeDecodeError:
        return None


def _recorded_cache_names(location: Location) -> list[str] | None:
    """A cache of an earlier deltakd without a marker, proved by its own valid manifest: the
    names it created. None when there is no such manifest (nothing is guessed from names)."""
    try:
        manifest = read_manifest(location)
    except DeltakdError:
        return None
    if manifest is None:
        return None
    return [name for name in OWN_NAMES if location.exists(name)]


def prepare_output(location: Location, settings: dict[str, Any], overwrite: bool) -> str:
    """Decide what to do with `--out` before any compute: 'fresh', 'resume' or 'complete'.
    Ownership by proof (outputs.py): a path holding anything its deltakd marker does not list
    (or anything, without a marker) is refused naming it, --overwrite or not; a cache of other
    settings, or another kind of deltakd output, is refused unless --overwrite, which then
    removes only the entries deltakd's marker lists."""
    if not location.url and Path(location.root).exists() and not Path(location.root).is_dir():
        raise DeltakdError(f"--out {location.root} exists and is not a directory")
    names = {name for name in location.list() if name != LOCK}
    marker = _read_marker(location)
    listed = [name for name in (marker or {}).get("files", []) if isinstance(name, str)]
    if marker is None and names:
        recorded = _recorded_cache_names(location)
        if recorded is None:
            raise refuse_foreign(location.root, sorted(names), "cache")
        marker = {"kind": "cache"}
        listed = recorded
    foreign = foreign_names(names - {MARKER}, listed)
    if foreign:
        raise refuse_foreign(location.root, foreign, "cache")
    names = {name for name in names if not name.endswith(PARTIAL_SUFFIX) and name != MARKER}
    kind = (marker or {}).get("kind")
    is_cache = kind == "cache"
    if names and not is_cache and not overwrite:
        raise DeltakdError(
            f"--out {location.root} holds a deltakd {kind} output, not a cache; choose another "
            "path, or pass --overwrite (which removes only what deltakd created there)"
        )
    if is_cache and names:
        previous = read_run_state(location)
        same = previous is not None and previous.get("settings") == settings
        if same and not overwrite:
            return "complete" if location.exists("manifest.json") else "resume"
        if not overwrite:
            what = "a complete cache" if "manifest.json" in names else "an unfinished cache"
            changed = _first_difference(previous.get("settings") if previous else None, settings)
            raise DeltakdError(
                f"{location.root} holds {what} made with other settings ({changed}); "
                "pass --overwrite to replace it, or choose another --out"
            )
    # Fresh: the manifest goes first, so nothing looks complete while the rest is cleared.
    # Only a cache's own names go; in a directory that was not a cache nothing is removed.
    for name in listed:
        if name and "/" not in name and name not in (LOCK, MARKER):
            location.remove(name)
    for name in location.list():
        if name.endswith(PARTIAL_SUFFIX):  # a listed name's leftover (anything else was refused)
            location.remove(name)
    location.write_text(MARKER, marker_text("cache", OWN_NAMES))
    location.write_text(SETTINGS_FILE, json.dumps({"settings": settings}, indent=2))
    return "fresh"


def _first_difference(old: dict | None, new: dict) -> str:
    if old is None:
        return "no recorded settings"
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key} differs"
    return "settings differ"


# ----------------------------------------------------------------------------- reader


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

    def __init__(self, path: str):
        self.location = Location(str(path))
        if not self.location.exists():
            raise DeltakdError(f"cache not found: {path}")
        manifest = read_manifest(self.location)
        if manifest is None:
            unfinished = self.location.exists(SETTINGS_FILE)
            state = "an unfinished cache" if unfinished else "not a cache"
            raise DeltakdError(f"{path}: {state} (no manifest.json); run cache-teachers to finish")
        self.manifest = manifest
        self.path = str(path)
        self.shard_names = [shard["name"] for shard in manifest["shards"]]
        self._groups: dict[int, Any] = {}
        self.skip_fields: tuple[str, ...] = ()  # per-position arrays a reader leaves unread
        self._offsets: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def num_shards(self) -> int:
        return len(self.shard_names)

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def has_student(self) -> bool:
        return bool(self.manifest["has_student"])

    @property
    def grid_points(self) -> tuple[GridPoint, ...]:
        """The (gamma, alpha) grid points in column order, as floats: the one reader of the
        manifest's grid (() without a grid; format 3 has none)."""
        points = (self.manifest.get("grid") or {}).get("points", ())
        return tuple((float(gamma), float(alpha)) for gamma, alpha in points)

    @property
    def tail_samples(self) -> int:
        """Draws per position of the sampled tail (0: none; formats 3 and 4 have none)."""
        return int(self.manifest.get("tail_samples") or 0)

    @property
    def temperature(self) -> float:
        """The temperature the cache's distributions (and draws) are at (1 before format 5)."""
        return float(self.manifest.get("temperature") or 1.0)

    def vocabulary(self) -> list[str | None]:
        """The token string of every id the cache uses (checked against the manifest)."""
        try:
            tokens = json.loads(self.location.read_text(VOCABULARY_FILE))
        except (FileNotFoundError, json.JSONDecodeError):
            raise DeltakdError(f"{self.path}: {VOCABULARY_FILE} is missing or damaged") from None
        from deltakd_cli.vocab import vocabulary_sha256

        if vocabulary_sha256(tokens) != self.manifest.get("vocabulary_sha256"):
            raise DeltakdError(f"{self.path}: {VOCABULARY_FILE} does not match the manifest")
        return tokens

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen zarr groups lazily
        state = dict(self.__dict__)
        state["_groups"] = {}
        return state

    def group(self, shard: int) -> Any:
        if shard not in self._groups:
            store = self.location.zarr_store(f"shards/{self.shard_names[shard]}.zarr", True)
            try:
                self._groups[shard] = zarr.open_group(store, mode="r")
            except Exception as error:
                raise DeltakdError(
                    f"{self.path}: shard {self.shard_names[shard]}: {error}"
                ) from None
        return self._groups[shard]

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
        dtypes = self.manifest.get("dtypes", {})
        trailing_of_kind = {"ids": (self.k,), "logprobs": (self.k,), "scalar": ()}
        trailing_of_kind["grid"] = (len(self.grid_points),)
        for kind in ("sample_ids", "counts", "sample_logprobs"):
            trailing_of_kind[kind] = (self.tail_samples,)
        total_examples = 0
        for shard, entry in enumerate(self.manifest["shards"]):
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
            total_examples += entry["examples"]
        if total_examples != self.manifest["counts"]["examples"]:
            raise DeltakdError(
                f"{self.path}: the shards hold {total_examples} examples, the "
                f"manifest {self.manifest['counts']['examples']}; rebuild the cache"
            )

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
        """Examples [start, stop) of a shard, with one contiguous read per array."""
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
        total = int(self.manifest["counts"]["examples"])
        raise DeltakdError(f"no example {example_index} in this cache (it has {total} examples)")

    def verify(self) -> list[str]:
        """Names of shards whose bytes no longer match the manifest's checksums."""
        damaged = []
        for shard in self.manifest["shards"]:
            group_path = f"shards/{shard['name']}.zarr"
            if not self.location.exists(group_path):
                damaged.append(f"{shard['name']} (missing)")
                continue
            if shard_checksums(self.location, group_path)["sha256"] != shard["sha256"]:
                damaged.append(shard["name"])
        return damaged
