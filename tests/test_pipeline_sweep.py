"""`pipeline --sweep`: the grid it parses and the choice it makes on validation only."""

from __future__ import annotations

import pytest

from deltakd_cli.errors import DeltakdError
from deltakd_cli.pipeline.sweep import SweepPoint, choose, parse_sweep


def test_a_gamma_sweep_keeps_alpha_and_names_each_point():
    points, alphas_swept = parse_sweep(["gamma=0,0.5,1"], alpha=1.5)
    assert points == [SweepPoint(0.0, 1.5), SweepPoint(0.5, 1.5), SweepPoint(1.0, 1.5)]
    assert not alphas_swept
    assert [p.role(False) for p in points] == [
        "student-gamma0", "student-gamma0.5", "student-gamma1"
    ]  # fmt: skip
    assert points[0].label(False) == "KD (gamma 0) student"
    assert points[2].label(False) == "Delta-KD (gamma 1) student"


def test_gamma_and_alpha_sweep_every_combination():
    points, alphas_swept = parse_sweep(["gamma=0.5,1", "alpha=1,2"], alpha=1.0)
    assert alphas_swept and len(points) == 4
    assert points[1].role(True) == "student-gamma0.5-alpha2"


@pytest.mark.parametrize(
    "specs, fragment",
    [
        (["gamma=0,2"], "outside [0, 1]"),
        (["gamma=0,x"], "'x' is not a number"),
        (["beta=1,2"], "NAME one of gamma, alpha"),
        (["gamma"], "NAME=V1,V2"),
        (["gamma=1", "gamma=0"], "given twice"),
        (["gamma=0.5"], "at least two points"),
        (["alpha=1,nan"], "finite"),
    ],
)
def test_bad_sweeps_are_one_line(specs, fragment):
    with pytest.raises(DeltakdError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        parse_sweep(specs, alpha=1.0)


def test_the_choice_reads_validation_scores_only_and_breaks_ties_by_grid_order():
    points, _ = parse_sweep(["gamma=0,0.5,1"], alpha=1.0)
    roles = {p.role(False): p for p in points}
    validation = [
        {"name": "student-sft", "mean": 40.0},  # not a sweep point: never chosen
        {"name": "student-gamma0", "mean": 20.0},
        {"name": "student-gamma0.5", "mean": 25.0},
        {"name": "student-gamma1", "mean": 25.0},
    ]
    assert choose(validation, roles) == "student-gamma0.5"
    with pytest.raises(DeltakdError, match="no score for student-gamma1"):
        choose(validation[:3], roles)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_the_sweep_chooses_on_validation_and_scores_every_point_on_test(tiny, tmp_path):
    """A real pipeline --sweep on the tiny fixture (real cache with the grid, real students),
    with a fake eval whose validation and test scores disagree: the point chosen is the
    validation's best; the test rows are scored for every point but never reach the choice.
    A gamma of 0.1234567 is cached and trained at exactly that value (a rounded 0.123457 would
    miss the cache's grid column, 1e-6 relative, and fall back to the bound)."""
    import json
    from pathlib import Path

    from deltakd_cli.commands import run_command
    from deltakd_cli.evaluate import report as eval_report
    from deltakd_cli.evaluate.rouge import METRICS
    from deltakd_cli.pipeline.options import PipelineOptions
    from deltakd_cli.pipeline.run import pipeline

    out = tmp_path / "run"
    best = {"validation": "student-gamma0.1234567", "test": "student-gamma1"}
    seen_data: list[str] = []

    def fake_eval(options) -> None:
        split = "validation" if Path(options.data).name == "validation.jsonl" else "test"
        seen_data.append(split)
        groups = dict(item.split("=", 1) for item in options.group)
        roles = {role: models.split(",") for role, models in groups.items()}
        records = []
        for role, members in roles.items():
            score = 30.0 if role == best[split] else 10.0
            for name in members:
                for row in range(3):
                    metrics = dict.fromkeys(METRICS, 0.0) | {"rougeL": score + row}
                    records.append({"model": name, "seed": None, "row": row, **metrics})
        order = [name for members in roles.values() for name in members]
        data_file = tmp_path / f"{split}-rows.jsonl"
        data_file.write_text('{"prompt": "p", "response": "r"}\n' * 3)
        comparisons = [tuple(c.split(":")) for c in options.compare]
        made = eval_report.assemble(
            "generate", data_file, [None] * 3, None, records, order, order[0], {},
            groups=roles, comparisons=comparisons,
        )  # fmt: skip
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(made))

    def runner(command, options):
        return fake_eval(options) if command == "eval" else run_command(command, options)

    options = PipelineOptions(
        teacher_base=str(tiny.teacher_base), teacher_tuned=str(tiny.teacher_tuned),
        student=str(tiny.student), train=str(tiny.train), test=str(tiny.test), out=str(out),
        sweep=["gamma=0,0.1234567,1"], validation_fraction=0.2, epochs=1, lr=1e-3, max_length=96,
        top_k=16, device="cpu", save_every=0,
    )  # fmt: skip
    summary = pipeline(options, runner)
    assert seen_data == ["validation", "test"]
    odd = "student-gamma0.1234567"
    assert summary["sweep"]["chosen"] == odd  # not test's best (gamma 1)
    rows = {row["role"]: row for row in summary["results"]["rows"]}
    assert set(rows) >= {"student-sft", "student-gamma0", odd, "student-gamma1"}
    assert rows[odd]["chosen"] and not rows["student-gamma1"]["chosen"]
    assert rows["student-gamma1"]["rougeL"] > rows[odd]["rougeL"]  # test
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["has_student"]
    assert [gamma for gamma, _ in manifest["grid"]["points"]] == [0.0, 0.1234567, 1.0]
    for role, gamma in (("student-gamma0", 0.0), (odd, 0.1234567), ("student-gamma1", 1.0)):
        run = json.loads((out / "models" / role / "run.json").read_text())
        assert run["options"]["objective"] == "kd-to-delta" and run["options"]["gamma"] == gamma
        cached_grid = run["provenance"]["cache"]["grid"]["points"]
        assert [gamma, run["options"]["alpha"]] in cached_grid  # the exact column, no fallback
    validation_rows = (out / "data" / "validation.jsonl").read_text().splitlines()
    test_rows = set(Path(tiny.test).read_text().splitlines())
    assert validation_rows and not set(validation_rows) & test_rows
    assert (out / "report" / "sweep.png").is_file() and (out / "report" / "sweep.csv").is_file()
