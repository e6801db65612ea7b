"""The Python API (`import deltakd`): docs/api.md runs as written on the tiny local models, the
import is light, and errors name options as keywords, never as flags."""

from __future__ import annotations

import json
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
def test_the_api_page_runs_as_written(tiny, tmp_path, monkeypatch, capfd):
    """Every python block of docs/api.md, in order, with the fixture's paths in place of the
    page's (the only substitution): the study (one cache, two objectives x two seeds, one eval
    side by side, its table, the report), its rerun skipped, and a refusal. Nothing is printed
    but what the page prints itself."""
    places = {
        '"models/base"': repr(str(tiny.teacher_base)),
        '"models/tuned"': repr(str(tiny.teacher_tuned)),
        '"models/student"': repr(str(tiny.student)),
        '"data/train.jsonl"': repr(str(tiny.train)),
        '"data/test.jsonl"': repr(str(tiny.test)),
    }
    blocks = code_blocks(DOC.read_text())
    assert len(blocks) == 7
    for placeholder in places:
        assert placeholder in blocks[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        for placeholder, path in places.items():
            block = block.replace(placeholder, path)
        exec(compile(block, str(DOC), "exec"), namespace)
    printed = capfd.readouterr()
    assert printed.err == ""  # the functions themselves print nothing
    lines = printed.out.splitlines()
    assert "response tokens cached" in lines[0]
    assert sum(" final loss " in line for line in lines) == 4
    result = namespace["result"]
    assert [group.label for group in result.groups] == ["delta", "kd", "S0"]
    assert [len(group.paths) for group in result.groups] == [2, 2, 1]
    delta_vs_kd = result.group_differences[0]
    assert (delta_vs_kd.model, delta_vs_kd.minus) == ("delta", "kd")
    assert len(delta_vs_kd.per_model_differences) == 2
    assert "delta - kd: " in printed.out and result.table() in printed.out
    assert (tmp_path / "runs/api/report/index.html").is_file()
    assert "skipped: True" in printed.out
    refused = printed.out.split("refused:")[1]
    assert "max_steps" in refused and "--max-steps" not in refused
    assert not (tmp_path / "runs/api/bad").exists()


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
    assert report.models[0].mean == by_path.models[0].mean
    assert not any(Path(m.path).exists() for m in report.models)  # the temp dir is gone


# ----------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    "command, values, message",
    [
        ("distill", {"max_steps": "4"}, "max_steps takes a whole number, got '4'"),
        ("distill", {"max_steps": 1.5}, "max_steps takes a whole number, got 1.5"),
        ("distill", {"max_steps": True}, "max_steps takes a whole number, got True"),
        ("distill", {"out": None}, "out is required; it is None"),
        ("distill", {"student": (1, 2)}, "student takes a path, a Hub id or a (model, tokenizer)"),
        ("distill", {"lr": "fast"}, "lr takes a number, got 'fast'"),
        ("finetune", {"data": ["a.jsonl"]}, "data takes a string or path, got ['a.jsonl']"),
        ("cache-teachers", {"gammas": "0,x"}, "gammas: 'x' is not a number"),
        ("eval", {"limit": "3"}, "limit takes a whole number, got '3'"),
        ("eval", {"model": ["m", 1]}, "model takes a list of strings or paths, got ['m', 1]"),
    ],
)
def test_a_wrong_type_is_one_line_naming_the_keyword_before_any_work(
    tmp_path, command, values, message
):
    """Before: a TypeError after the output folder was made (max_steps="4"), or a value taken
    silently (max_steps=True as 1)."""
    out = tmp_path / "out"
    given = {
        "distill": {"cache": str(tmp_path / "cache"), "student": "s", "out": out},
        "finetune": {"model": "m", "data": "d.jsonl", "out": out},
        "cache-teachers": {
            "teacher_base": "b",
            "teacher_tuned": "t",
            "data": "d.jsonl",
            "out": out,
        },  # fmt: skip
        "eval": {"model": ["m"], "data": "d.jsonl", "out": out / "r.json"},
    }[command]
    function = {"distill": deltakd.distill, "finetune": deltakd.finetune,
                "cache-teachers": deltakd.cache_teachers,
                "eval": deltakd.evaluate}[command]  # fmt: skip
    with pytest.raises(deltakd.DeltakdError) as error:
        function(**{**given, **values})
    assert message in str(error.value) and "--" not in str(error.value)
    assert not out.exists()


def test_the_first_argument_is_the_commands_options_or_nothing(tmp_path):
    """A positional path, or another command's options, is one line (before: AttributeError)."""
    with pytest.raises(deltakd.DeltakdError, match="got a str as its first argument"):
        deltakd.distill(str(tmp_path / "cache"), student="s", out=str(tmp_path / "o"))
    finetune = deltakd.options_of("finetune", model="m", data="d", out=str(tmp_path / "o"))
    with pytest.raises(deltakd.DeltakdError, match="one DistillOptions .* got a FinetuneOptions"):
        deltakd.distill(finetune)
    with pytest.raises(deltakd.DeltakdError, match="verbose takes True or False"):
        deltakd.distill(cache="c", student="s", out="o", verbose="yes")


def test_a_path_is_taken_wherever_a_path_is(tmp_path):
    """A pathlib.Path is the path's string in the options (before: a TypeError at the manifest's
    json.dumps, after the whole cache was computed)."""
    options = deltakd.options_of(
        "cache-teachers", teacher_base=tmp_path / "b", teacher_tuned=tmp_path / "t",
        data=tmp_path / "d.jsonl", out=tmp_path / "cache", gammas=[0, 1],
    )  # fmt: skip
    assert options.out == str(tmp_path / "cache") and isinstance(options.teacher_base, str)
    assert options.gammas == (0.0, 1.0)
    report = deltakd.options_of("report", dirs=[tmp_path / "a"], out=tmp_path / "r")
    assert report.dirs == [str(tmp_path / "a")]
    one = deltakd.options_of("report", dirs=tmp_path / "a", out=tmp_path / "r")
    assert one.dirs == [str(tmp_path / "a")]  # one of a list option's one or more


# ----------------------------------------------------------------------------- quiet, typed


@pytest.fixture
def scored(tmp_path):
    """Test rows and three models' predictions for them (eval's predictions mode: no model)."""
    from conftest import make_rows, write_jsonl

    rows = make_rows(6, seed=3)
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    lines = []
    for model, keep in (("a", 3), ("b", 2), ("c", 1)):
        for row in rows:
            words = row["response"].split()
            lines.append({"model": model, "prediction": " ".join(words[:keep])})
    predictions = write_jsonl(tmp_path / "predictions.jsonl", lines)
    return data, predictions


def test_evaluate_prints_nothing_unless_asked_and_logs(scored, capfd, caplog):
    """Before: rich tables on stdout, the whole report with json=True, and 'add --out
    REPORT.json' on stderr."""
    data, predictions = scored
    with caplog.at_level("INFO", logger="deltakd"):
        result = deltakd.evaluate(predictions=predictions, data=data, json=True)
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""
    assert isinstance(result, deltakd.Evaluation)
    (note,) = [r.getMessage() for r in caplog.records if "not saved" in r.getMessage()]
    assert "out=REPORT.json" in note and "--" not in note
    deltakd.evaluate(predictions=predictions, data=data, verbose=True)
    assert "ROUGE-L" in capfd.readouterr().out


def test_evaluate_takes_python_structures_and_returns_one_vocabulary(scored, tmp_path):
    """group= a dict, compare= pairs; the result names models by label and differences as
    model minus `minus`, as REPORT.json does (before: `baseline`/`excludes_zero` there and
    `minus`/`beyond_noise` in summary.json; a dict group= failed)."""
    data, predictions = scored
    out = tmp_path / "report.json"
    result = deltakd.evaluate(predictions=predictions, data=data, out=out,
                              group={"ab": ["a", "b"]}, compare=[("ab", "c")])  # fmt: skip
    as_strings = deltakd.evaluate(predictions=predictions, data=data,
                                  group=["ab=a,b"], compare=["ab:c"])  # fmt: skip
    assert [(g.label, g.paths) for g in result.groups] == [("ab", ["a", "b"])]
    (difference,) = result.group_differences
    assert (difference.model, difference.minus) == ("ab", "c")
    assert difference == as_strings.group_differences[0]
    scores = {model.label: model.rouge_l for model in result.models}
    assert scores["a"] > scores["b"] > scores["c"]
    assert difference.difference == pytest.approx((scores["a"] + scores["b"]) / 2 - scores["c"])
    written = json.loads(out.read_text())
    for entry in written["differences"] + written["group_differences"]:
        assert {"model", "minus", "beyond_noise"} <= set(entry)
        assert not {"baseline", "excludes_zero"} & set(entry)
    assert result.path == out and "ab - c: " in result.table()
    old = {**written, "differences": [
        {**{k: v for k, v in d.items() if k not in ("minus", "beyond_noise")},
         "baseline": d["minus"], "excludes_zero": d["beyond_noise"]}
        for d in written["differences"]]}  # fmt: skip
    assert deltakd.Evaluation.from_record(old).differences == result.differences


def test_every_stage_reruns_by_one_rule(scored, tmp_path):
    """Complete and identical: skipped (the record read back); different: refused in one line
    naming overwrite=; overwrite=True: redone. (Before: eval refused its own identical rerun.)
    The training and cache stages keep the same rule: tests/test_reliability.py and the
    docs/api.md study."""
    data, predictions = scored
    out = tmp_path / "report.json"
    first = deltakd.evaluate(predictions=predictions, data=data, out=out)
    written = out.stat().st_mtime_ns
    again = deltakd.evaluate(predictions=predictions, data=data, out=out)
    assert again.record["created"] == first.record["created"]
    assert again.models == first.models and out.stat().st_mtime_ns == written
    with pytest.raises(deltakd.DeltakdError, match="already exists .* pass overwrite"):
        deltakd.evaluate(predictions=predictions, data=data, out=out, limit=3)
    redone = deltakd.evaluate(predictions=predictions, data=data, out=out, limit=3, overwrite=True)
    assert redone.models[0].rows == 3


@pytest.mark.slow
def test_inspect_push_and_report_are_functions(tiny, tmp_path, monkeypatch, capfd):
    """deltakd.inspect, deltakd.push and deltakd.report call their commands (before: only the
    command line had them), quietly, with typed results; the Hub is replaced by recorders."""
    import shutil

    from huggingface_hub import HfApi, constants

    cache = deltakd.cache_teachers(teacher_base=tiny.teacher_base, teacher_tuned=tiny.teacher_tuned,
                                   student=tiny.student, data=tiny.train, out=tmp_path / "cache",
                                   device="cpu", top_k=8)  # fmt: skip
    again = deltakd.cache_teachers(
        deltakd.options_of(  # an options object, the same settings
            "cache-teachers",
            teacher_base=tiny.teacher_base,
            teacher_tuned=tiny.teacher_tuned,
            student=tiny.student,
            data=tiny.train,
            out=tmp_path / "cache",
            device="cpu",
            top_k=8,
        )
    )
    assert not cache.skipped and again.skipped and again.record == cache.record
    summary = deltakd.inspect(cache=cache.path, verify=True)
    assert summary["verified"] is True and summary["examples"] == cache.examples
    assert summary["response_tokens"] == cache.response_tokens and summary["top_k"] == 8

    uploaded = []
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: repo_id)
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: uploaded.append(kw))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    model = tmp_path / "model"
    shutil.copytree(tiny.student, model)
    pushed = deltakd.push(dir=model, repo="someone/tiny")
    assert pushed.repo == "someone/tiny" and "model.safetensors" in pushed.files
    assert uploaded[0]["allow_patterns"] == pushed.files

    run = deltakd.distill(cache=cache.path, student=tiny.student, out=tmp_path / "run",
                          max_steps=2, device="cpu")  # fmt: skip
    page = deltakd.report(dirs=run.path, out=tmp_path / "report")
    assert page.page == tmp_path / "report" / "index.html" and page.page.is_file()
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""
