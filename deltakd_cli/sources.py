"""Where rows come from: a JSONL file (read here, with line-numbered errors), a JSON array, a
parquet or CSV file, a directory saved with `datasets.save_to_disk`, or a dataset on the
Hugging Face Hub (the last four through the `datasets` library, an optional extra). Every
source yields plain dicts with a `where` that names the file and row in errors, and a
fingerprint of its content for provenance and resume checks."""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltakd_cli.errors import DeltakdError

DATASETS_HINT = "pip install 'deltakd[data]'"
TABULAR = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class DataSource:
    """A data option as given: a path or Hub dataset name, and for `datasets` sources the split
    and configuration to read."""

    spec: str
    split: str | None = None
    config: str | None = None

    @property
    def path(self) -> Path:
        text = self.spec[len("file://") :] if self.spec.startswith("file://") else self.spec
        return Path(os.path.expanduser(text))

    @property
    def kind(self) -> str:
        """jsonl, json, parquet, csv, saved (a save_to_disk directory), or hub."""
        path = self.path
        if path.is_dir():
            if any((path / name).is_file() for name in SAVED_DATASET_FILES):
                return "saved"
            raise DeltakdError(
                f"{self.spec}: a directory, but not one saved with datasets.save_to_disk "
                f"(no {' / '.join(SAVED_DATASET_FILES)})"
            )
        if path.suffix.lower() in TABULAR:
            return TABULAR[path.suffix.lower()]
        if path.suffix.lower() == ".json":
            return "json"
        if path.exists() or looks_like_path(self.spec):
            return "jsonl"
        return "hub"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unreadable_file(path: Path, what: str) -> str:
    """Why `path` cannot be read as a file, in one line: missing, a broken symlink, a directory,
    or not a regular file (a FIFO: deltakd reads its inputs twice, to hash and to read)."""
    if path.is_symlink() and not path.exists():
        return f"{what} {path} is a broken symlink (to {os.readlink(path)})"
    if not path.exists():
        return f"{what} not found: {path}"
    if path.is_dir():
        return f"{what} {path} is a directory, not a file"
    return (
        f"{what} {path} is not a regular file (a FIFO, socket or device): deltakd hashes its "
        "inputs and then reads them, so write it to a file first"
    )


def check_text(where: str, value: Any) -> Any:
    """`value` (a row or one of its fields) unchanged, or one line naming the row and field
    when a string in it holds a lone surrogate (which no UTF-8 file can encode). A NUL is
    ordinary text (tokenizers read it; models generate it) and passes through."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise DeltakdError(
                f"{where}: text holds a lone surrogate ({value[error.start]!a} at character "
                f"{error.start}), not valid Unicode; fix the row"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(f"{where} field {key!r}" if " field " not in where else where, item)
    elif isinstance(value, list):
        for item in value:
            check_text(where, item)
    return value


class _DuplicateKey(ValueError):
    """A JSON object that names one key twice (json keeps the last silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _twice(where: str, error: _DuplicateKey) -> DeltakdError:
    return DeltakdError(
        f"{where}: the key {error.args[0]!r} appears twice in one object (JSON would keep only "
        "the last); give each field its own name"
    )


def _without_bom(raw: bytes) -> bytes:
    """Text without a leading UTF-8 byte-order mark (some editors write one)."""
    return raw[len(codecs.BOM_UTF8) :] if raw.startswith(codecs.BOM_UTF8) else raw


def parse_json(where: str, text: str) -> Any:
    """One JSON value; not JSON, or an object naming a key twice, is one line naming `where`."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as error:
        raise _twice(where, error) from None
    except json.JSONDecodeError as error:
        raise DeltakdError(f"{where}: not valid JSON ({error.msg})") from None


def _decoded(where: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DeltakdError(
            f"{where}: not UTF-8 text (byte {raw[error.start]:#04x} at byte {error.start} of the "
            "line); save the file as UTF-8"
        ) from None


def read_jsonl(path: str | Path, what: str = "data file") -> Iterator[tuple[str, Any]]:
    """(where, value) for every non-blank line of a JSONL file, `where` being PATH:LINE. A
    missing or unreadable file, a line that is not JSON (or names a key twice), bytes that are
    not UTF-8 (a leading byte-order mark is allowed) or a string no UTF-8 file can hold raises
    one DeltakdError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DeltakdError(unreadable_file(path, what))
    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                where = f"{path}:{number}"
                line = _decoded(where, _without_bom(raw) if number == 1 else raw)
                if not line.strip():
                    continue
                yield where, check_text(where, parse_json(where, line))
    except OSError as error:
        raise DeltakdError(f"cannot read {what} {path}: {error.strerror}") from None


def looks_like_path(spec: str) -> bool:
    """A spec written like a path (it then never goes to the Hub)."""
    if spec.startswith(("./", "../", "/", "~", "file://")):
        return True
    path = Path(spec)
    if path.suffix.lower() in (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt"):
        return True
    return len(path.parts) > 1 and Path(path.parts[0]).exists() or spec.count("/") > 1


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DeltakdError(
            f"reading this data needs the datasets library: {DATASETS_HINT}"
        ) from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def _read_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    raw = _without_bom(path.read_bytes())
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DeltakdError(
            f"{path}:{line}: not UTF-8 text (byte {raw[error.start]:#04x}); save the file as UTF-8"
        ) from None
    except _DuplicateKey as error:
        raise _twice(str(path), error) from None
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # JSON Lines under a .json name
            yield from read_jsonl(path)
            return
        raise DeltakdError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DeltakdError(f"{path}: expected a JSON array of rows (or JSON Lines)")
    for index, row in enumerate(value):
        yield f"{path}[{index}]", row


def _pick_split(found: Any, source: DataSource) -> Any:
    """A Dataset from what `datasets` returned (a DatasetDict needs a split, or has one)."""
    datasets = _datasets()
    if isinstance(found, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = sorted(found.keys())
        if source.split is None:
            if len(splits) == 1:
                return found[splits[0]]
            raise DeltakdError(f"{source.spec} has the splits {', '.join(splits)}: give --split")
        if source.split not in found:
            raise DeltakdError(
                f"{source.spec} has no split '{source.split}' (it has {', '.join(splits)})"
            )
        return found[source.split]
    return found


def _header(source: DataSource) -> list[str]:
    """The column names a parquet or CSV file declares, read before `datasets` (which fails on
    two parquet columns of one name with a DatasetGenerationError, and renames a CSV's second
    one to NAME.1)."""
    path = source.path
    if source.kind == "parquet":
        import pyarrow.parquet as parquet

        try:
            return list(parquet.read_schema(path).names)
        except Exception:  # not parquet: `datasets` says so below
            return []
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
            return next(csv.reader(handle, delimiter=delimiter), [])
    except (OSError, csv.Error):
        return []


def check_columns(source: DataSource, names: list[str]) -> None:
    """One line when a column name appears more than once."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        listed = ", ".join(f"{name!r} ({names.count(name)} times)" for name in repeated)
        raise DeltakdError(
            f"{source.spec}: more than one column named {listed}; give each column its own name"
        )


def _load_with_datasets(source: DataSource) -> Any:
    datasets = _datasets()
    kind = source.kind
    if kind in ("parquet", "csv"):
        check_columns(source, _header(source))
    try:
        if kind == "saved":
            found = datasets.load_from_disk(str(source.path))
        elif kind in ("parquet", "csv"):
            options = {"delimiter": "\t"} if source.path.suffix.lower() == ".tsv" else {}
            found = datasets.load_dataset(
                kind, data_files=str(source.path), split="train", **options
            )
        else:
            found = datasets.load_dataset(source.spec, source.config, split=source.split)
    except DeltakdError:
        raise
    except (FileNotFoundError, ConnectionError, OSError) as error:
        if kind != "hub":
            raise DeltakdError(f"cannot read {source.spec}: {error}") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub is unreachable"
        raise DeltakdError(
            f"dataset '{source.spec}' is not a local file, so it names a Hub dataset, and {why}; "
            "download it first, or point at local files (JSONL, JSON, parquet, CSV or a "
            "save_to_disk directory)"
        ) from None
    except ValueError as error:  # unknown split or config, unreadable file, no rows
        first = str(error).strip().splitlines()[0]
        if "corresponds to no data" in first:
            raise DeltakdError(f"{source.spec}: no rows") from None
        raise DeltakdError(f"cannot read {source.spec}: {first}") from None
    except datasets.exceptions.DatasetsError as error:  # the generation failed: say why
        cause = error.__cause__ or error.__context__ or error
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise DeltakdError(f"cannot read {source.spec}: {first}") from None
    found = _pick_split(found, source)
    check_columns(source, list(found.column_names or []))
    return found


def read_rows(source: DataSource, what: str = "data file") -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of the source, in order."""
    kind = source.kind
    if kind == "jsonl":
        yield from read_jsonl(source.path, what)
        return
    if source.split is not None and kind not in ("saved", "hub"):
        raise DeltakdError(f"--split {source.split}: {source.spec} is one file, it has no splits")
    if kind == "json":
        if not source.path.is_file():
            raise DeltakdError(unreadable_file(source.path, what))
        for where, row in _read_json_array(source.path):
            yield where, check_text(where, row)
        return
    if kind in ("parquet", "csv") and not source.path.is_file():
        raise DeltakdError(unreadable_file(source.path, what))
    dataset = _load_with_datasets(source)
    if len(dataset) == 0:
        raise DeltakdError(f"{source.spec}: no rows")
    name = source.spec + (f" split {source.split}" if source.split else "")
    for index, row in enumerate(dataset):
        where = f"{name}[row {index}]"
        yield where, check_text(where, dict(row))


def columns_of(source: DataSource) -> list[str]:
    """The column names of a tabular or `datasets` source (for error messages)."""
    if source.kind in ("jsonl", "json"):
        return []
    return list(_load_with_datasets(source).column_names)


def fingerprint(source: DataSource) -> dict[str, Any]:
    """What identifies the source's content: a file's sha256, the sha256 of a saved dataset's
    files, or a Hub dataset's name, configuration, split and `datasets` fingerprint."""
    kind = source.kind
    if kind == "hub":
        dataset = _load_with_datasets(source)
        return {
            "hub": source.spec,
            "config": source.config,
            "split": source.split,
            "fingerprint": getattr(dataset, "_fingerprint", None),
            "sha256": hashlib.sha256(
                json.dumps([source.spec, source.config, source.split,
                            getattr(dataset, "_fingerprint", None)]).encode()
            ).hexdigest(),
        }  # fmt: skip
    if kind == "saved":
        digest = hashlib.sha256()
        for path in sorted(p for p in source.path.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(source.path)).encode() + b"\0")
            digest.update(bytes.fromhex(file_sha256(path)))
        return {"path": str(source.path.resolve()), "split": source.split,
                "sha256": digest.hexdigest()}  # fmt: skip
    if not source.path.is_file():
        raise DeltakdError(unreadable_file(source.path, "data file"))
    return {"path": str(source.path.resolve()), "sha256": file_sha256(source.path)}


def text_file_rows(path: Path) -> list[dict[str, str]]:
    """A .txt file as text rows: one document per non-empty line, ids by line number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DeltakdError(f"{path}: not UTF-8 text") from None
    rows = [{"id": str(n), "text": line} for n, line in enumerate(lines) if line.strip()]
    if not rows:
        raise DeltakdError(f"{path}: no text (the file is empty)")
    return rows
