"""The cache's record (`CacheRecord`, what manifest.json holds: the one place its fields are
named, and where older formats' names are mapped), the manifest's checksums (a cache is complete
iff its manifest exists), the run state of an unfinished cache, and the claim on an output folder
(`prepare_output`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deltakd_cli.cache.location import SETTINGS_FILE, VOCABULARY_FILE, Location
from deltakd_cli.cache.schema import (
    FORMAT_VERSION,
    READABLE_FORMAT_VERSIONS,
    SHARD_NAME,
)
from deltakd_cli.errors import DeltakdError
from deltakd_cli.outputs import (
    LOCK,
    MARKER,
    PARTIAL_SUFFIX,
    foreign_names,
    marker_text,
    parse_marker,
    refuse_foreign,
)


@dataclass(frozen=True)
class CacheRecord:
    """What manifest.json says about a complete cache, typed; docs/cache-format.md documents
    each field. Read with `read_manifest`, written with `write_manifest`; nothing else reads the
    manifest's JSON."""

    format_version: int
    vocab_size: int
    top_k: int  # ids kept per target position ("k" in the manifests of formats 3 to 5)
    selection: str
    tail_rule: str
    alpha: float | None  # None without a student
    has_student: bool
    precision: str
    dtypes: dict[str, str]  # array name -> dtype
    counts: dict[str, int]  # examples, tokens, response_tokens, truncated
    shards: list[dict[str, Any]]  # name, the committed counts, sha256, bytes, array_bytes
    vocabulary_sha256: str
    provenance: dict[str, Any]
    bytes: int
    bytes_per_response_token: float
    bytes_per_response_token_by_array: dict[str, float] = field(default_factory=dict)
    grid: dict[str, Any] | None = None  # points, field, bytes_per_response_token, stored...
    tail_samples: int = 0  # draws per position (none before format 5)
    sample_seed: int | None = None
    proposal: str | None = None
    temperature: float = 1.0  # of every stored distribution (1 before format 5)
    tool: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    command: str = "cache-teachers"
    options: dict[str, Any] = field(default_factory=dict)  # the run's options (a --config)
    paths: str | None = None  # how the options' paths are written ("absolute"; None before)
    timing: dict[str, Any] | None = None
    manifest_sha256: str | None = None  # set when read from disk

    @property
    def grid_points(self) -> tuple[tuple[float, float], ...]:
        """The (gamma, alpha) grid points in column order, as floats (() without a grid)."""
        points = (self.grid or {}).get("points", ())
        return tuple((float(gamma), float(alpha)) for gamma, alpha in points)

    @property
    def shard_names(self) -> list[str]:
        return [shard["name"] for shard in self.shards]

    def to_json(self) -> dict[str, Any]:
        """The manifest's JSON object in this deltakd's format (without its checksum)."""
        record = asdict(self)
        record.pop("manifest_sha256")
        return record

    @classmethod
    def from_json(cls, manifest: dict[str, Any]) -> CacheRecord:
        """A manifest of any readable format; the older formats' names are mapped here."""
        values = dict(manifest)
        if "k" in values and "top_k" not in values:  # formats 3 to 5
            values["top_k"] = values.pop("k")
        values.pop("settings", None)  # formats 3 to 5 repeated settings.json here
        values["tail_samples"] = int(values.get("tail_samples") or 0)
        values["temperature"] = float(values.get("temperature") or 1.0)
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{name: value for name, value in values.items() if name in known})


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


def write_manifest(location: Location, record: CacheRecord) -> None:
    """Written last and atomically: a cache is complete iff its manifest exists. The manifest
    carries its own checksum, so an edit (of top_k, alpha, a shard name...) is caught on read."""
    manifest = record.to_json()
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    location.write_text("manifest.json", json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(location: Location) -> CacheRecord | None:
    """The manifest's record, checked against its own checksum and for well-formed shard
    names; None when there is no manifest (the cache is unfinished, or not a cache)."""
    manifest = read_manifest_json(location)
    if manifest is None:
        return None
    try:
        return CacheRecord.from_json(manifest)
    except (TypeError, ValueError) as error:  # a field missing or of the wrong type
        raise DeltakdError(
            f"{location.root}: manifest.json is damaged ({error}); rebuild the cache"
        ) from None


def read_manifest_json(location: Location) -> dict[str, Any] | None:
    """The manifest's JSON as written, checked against its own checksum and for well-formed
    shard names."""
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
