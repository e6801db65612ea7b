"""train/checkpoint.py's resume rules, on recorded options alone: what a resume may change
(train further, a moved cache) and what it may not."""

from __future__ import annotations

import json

import pytest

from deltakd_cli.errors import DeltakdError
from deltakd_cli.train.checkpoint import check_resumable
from deltakd_cli.train.options import OPTIONS_ADDED_LATER, OPTIONS_THAT_MATTER

SOURCE = {"cache": "/data/cache", "manifest_sha256": "abc"}


def identity(**changes):
    values = {name: OPTIONS_ADDED_LATER.get(name) for name in OPTIONS_THAT_MATTER}
    values.update(source=SOURCE, epochs=1, max_steps=0, lr=1e-3, seed=0)
    values.update(changes)
    return values


def checkpoint_of(root, **saved):
    path = root / "step-4"
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"step": 4, "options": identity(**saved)}))
    return path


def test_more_epochs_or_steps_train_further(tmp_path):
    path = checkpoint_of(tmp_path)
    assert check_resumable(path, identity()) == {}
    assert check_resumable(path, identity(epochs=3)) == {"extended": {"epochs": [1, 3]}}
    with pytest.raises(DeltakdError, match="--epochs changed"):
        check_resumable(path, identity(epochs=0))


def test_max_steps_grow_only_when_they_were_set(tmp_path):
    path = checkpoint_of(tmp_path, max_steps=4)
    assert check_resumable(path, identity(max_steps=6)) == {"extended": {"max_steps": [4, 6]}}
    with pytest.raises(DeltakdError, match="--max-steps changed"):
        check_resumable(path, identity(max_steps=3))
    epochs_run = checkpoint_of(tmp_path / "epochs-run")
    with pytest.raises(DeltakdError, match="--max-steps changed"):  # epochs -> steps: another plan
        check_resumable(epochs_run, identity(max_steps=100))
    # with --max-steps set, more --epochs change nothing and are refused as a change
    with pytest.raises(DeltakdError, match="--epochs changed"):
        check_resumable(path, identity(max_steps=4, epochs=2))


def test_a_moved_cache_is_the_same_cache_by_its_manifest(tmp_path):
    path = checkpoint_of(tmp_path)
    moved = {**SOURCE, "cache": "/elsewhere/cache"}
    assert check_resumable(path, identity(source=moved)) == {
        "cache_moved": ["/data/cache", "/elsewhere/cache"]
    }
    rebuilt = {**SOURCE, "manifest_sha256": "def"}
    with pytest.raises(DeltakdError, match="is not the one step-4 trained on"):
        check_resumable(path, identity(source=rebuilt))
    with pytest.raises(DeltakdError, match="--lr changed"):
        check_resumable(path, identity(source=moved, lr=2e-3))


def test_a_moved_finetune_data_file_is_the_same_data_by_its_sha256(tmp_path):
    data = {"data": "/rows/train.jsonl", "data_sha256": "123", "template": "alpaca"}
    path = checkpoint_of(tmp_path, source=data)
    moved = {**data, "data": "/elsewhere/train.jsonl"}
    assert check_resumable(path, identity(source=moved)) == {
        "data_moved": ["/rows/train.jsonl", "/elsewhere/train.jsonl"]
    }
    with pytest.raises(DeltakdError, match="--cache/--data/--template"):
        check_resumable(path, identity(source={**moved, "template": "chat"}))
