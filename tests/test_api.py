"""The Python API (`import deltakd`): docs/api.md runs as written on the tiny local models, the
import is light, and errors name options as keywords, never as flags."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

import deltakd

DOC = REPO / "docs" / "api.md"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_the_api_page_runs_as_written(tiny, tmp_path, monkeypatch, capsys):
    """Every python block of docs/api.md, in order, with the fixture's paths in place of the
    page's (the only substitution)."""
    places = {
        '"models/base"': repr(str(tiny.teacher_base)),
        '"models/tuned"': repr(str(tiny.teacher_tuned)),
        '"models/student"': repr(str(tiny.student)),
        '"data/train.jsonl"': repr(str(tiny.train)),
        '"data/test.jsonl"': repr(str(tiny.test)),
    }
    blocks = code_blocks(DOC.read_text())
    assert len(blocks) == 5
    for placeholder in places:
        assert placeholder in blocks[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        for placeholder, path in places.items():
            block = block.replace(placeholder, path)
        exec(compile(block, str(DOC), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "response tokens cached" in printed and "delta final loss" in printed
    assert set(namespace["report"]["labels"].values()) == {"delta", "kd", "base"}
    assert (tmp_path / "runs/api/student-delta/model.safetensors").is_file()
    refused = printed.split("refused:")[1]
    assert "max_steps" in refused and "--max-steps" not in refused


def test_importing_deltakd_loads_nothing_heavy():
    code = "import sys, deltakd; print(sorted(m for m in ('torch', 'transformers', 'zarr') if m in sys.modules))"  # noqa: E501
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, check=True)  # fmt: skip
    assert result.stdout.strip() == "[]"
    assert set(deltakd.__all__) >= {"cache_teachers", "distill", "finetune", "evaluate",
                                    "pipeline", "DeltakdError"}  # fmt: skip


def test_options_are_checked_as_keywords(tmp_path):
    with pytest.raises(deltakd.DeltakdError, match="distill has no option 'max_step'"):
        deltakd.distill(cache="c", student="s", out="o", max_step=3)
    with pytest.raises(deltakd.DeltakdError, match="distill needs cache"):
        deltakd.distill(student="s", out="o")
    with pytest.raises(deltakd.DeltakdError) as error:
        deltakd.distill(cache=str(tmp_path / "none"), student="s", out=str(tmp_path / "o"),
                        objective="delta", gamma=0.5)  # fmt: skip
    assert "does not read gamma" in str(error.value) and "--" not in str(error.value)
    with pytest.raises(deltakd.DeltakdError, match="no stage"):
        deltakd.options_of("train")


@pytest.mark.slow
def test_a_model_object_pair_is_saved_and_used(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny.student)
    tokenizer = AutoTokenizer.from_pretrained(tiny.student)
    report = deltakd.evaluate(model=(model, tokenizer), data=str(tiny.test), limit=2,
                              max_new_tokens=4, device="cpu")  # fmt: skip
    by_path = deltakd.evaluate(model=str(tiny.student), data=str(tiny.test), limit=2,
                               max_new_tokens=4, device="cpu")  # fmt: skip
    assert report["models"][0]["mean"] == by_path["models"][0]["mean"]
    assert not any(Path(m["name"]).exists() for m in report["models"])  # the temp dir is gone
