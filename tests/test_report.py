"""`deltakd report`: real inputs (a distill run made here, a run in progress with held-out lines,
eval reports assembled from scored records, a pipeline directory built from them), real PNGs,
and the numbers next to each plot equal to the files they came from."""

from __future__ import annotations

import csv
import json
import random
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import assert_one_line_error, cache_args, flat, run_cli

from deltakd_cli import outputs
from deltakd_cli.data import Example
from deltakd_cli.evaluate import report as eval_report
from deltakd_cli.pipeline import plan
from deltakd_cli.pipeline.results import results_table
from deltakd_cli.report import collect, plots

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def distill_run(tiny, tmp_path_factory) -> Path:
    """A real (tiny) distill run: run.json and a metrics.jsonl line per step."""
    root = tmp_path_factory.mktemp("report-inputs")
    cache = root / "cache"
    result = run_cli(cache_args(tiny, cache, "--top-k", 8))
    assert result.exit_code == 0, result.output
    out = root / "delta"
    result = run_cli([
        "distill", "--cache", cache, "--student", tiny.student, "--out", out,
        "--objective", "delta", "--max-steps", 4, "--lr", "5e-3", "--batch-size", 4,
        "--num-workers", 0, "--device", "cpu", "--save-every", 0,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory) -> Path:
    """A run still in progress (no run.json) whose metrics.jsonl has held-out lines, a step
    logged twice (the later line wins) and a last line cut by a kill."""
    out = tmp_path_factory.mktemp("report-inputs") / "kd-in-progress"
    out.mkdir()
    lines = []
    for step in range(1, 9):
        lines.append({"step": step, "epoch": 0, "loss": 10.0 / step**1.7, "sft": 1.0,
                      "distill": 2.0, "lr": 1e-3, "grad_norm": 1.0, "target_tokens": 40,
                      "tokens_per_s": 100.0, "elapsed_s": float(step)})  # fmt: skip
        if step % 3 == 0:
            lines.append({"step": step, "eval_loss": 12.0 / step, "eval_sft": 1.5,
                          "eval_distill": 2.5})  # fmt: skip
    lines.append({**lines[-1], "loss": 0.123456789})  # step 8 again: this one counts
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 9, "lo'
    (out / "metrics.jsonl").write_text(text)
    return out


def scored_records(models: list[str], seeds: list[int | None], rows: int, seed: int) -> tuple:
    """Records as eval makes them (make_record scores real text), each model a little better or
    worse at copying the reference."""
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog near river bank at night".split()
    examples = [
        Example(id=f"r{i}", instruction="title", references=[" ".join(rng.sample(words, 6))])
        for i in range(rows)
    ]
    records = []
    for rank, model in enumerate(models):
        for run_seed in seeds:
            for row, example in enumerate(examples):
                reference = example.references[0].split()
                kept = [w for w in reference if rng.random() < 0.35 + 0.1 * (rank % 4)]
                prediction = " ".join(kept + rng.sample(words, 2))
                records.append(
                    eval_report.make_record(example, row, model, run_seed, "p", prediction)
                )
    return examples, records


def greedy_protocol_record(seeds: list[int]) -> dict:
    return {
        "name": "minillm", "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
        "seeds": seeds, "max_new_tokens": 8, "max_prompt_length": 64,
        "matches_published_protocol": False,
    }  # fmt: skip


@pytest.fixture(scope="module")
def plain_report(tiny, tmp_path_factory) -> Path:
    """An eval report of three models, two eval seeds each, no groups: baseline differences."""
    models = ["runs/sft", "runs/kd", "runs/delta"]
    examples, records = scored_records(models, [10, 20], rows=12, seed=1)
    report = eval_report.assemble(
        "generate", tiny.test, examples, None, records, models, models[0],
        {"protocol": greedy_protocol_record([10, 20]), "predictions": None},
    )  # fmt: skip
    path = tmp_path_factory.mktemp("report-inputs") / "dolly.json"
    eval_report.write_outputs(report, records, path)
    return path


@pytest.fixture(scope="module")
def pipeline_dir(tiny, tmp_path_factory, distill_run, held_out_run) -> Path:
    """A pipeline directory as `deltakd pipeline --student-seeds 0,1` leaves it: summary.json,
    eval/report.json (grouped by role, the pipeline's comparisons) and models/*/ runs (copies of
    the real runs above; the teachers have no metrics.jsonl)."""
    out = tmp_path_factory.mktemp("report-inputs") / "pipeline"
    models_dir = out / "models"
    roles = {
        "teacher-base": ["teachers/base"],
        "teacher-tuned": [str(models_dir / "teacher-tuned")],
        "student-base": ["students/s0"],
    }
    for objective in plan.STUDENT_OBJECTIVES:
        roles[f"student-{objective}"] = [
            str(models_dir / f"student-{objective}-seed{seed}") for seed in (0, 1)
        ]
    for members in roles.values():
        for member in members:
            if Path(member).parent == models_dir:
                Path(member).mkdir(parents=True)
                (Path(member) / "config.json").write_text("{}")
    for seed in (0, 1):  # two student runs with their curves and records
        target = models_dir / f"student-delta-seed{seed}"
        shutil.copy(distill_run / "metrics.jsonl", target / "metrics.jsonl")
        record = json.loads((distill_run / "run.json").read_text())
        record["options"]["seed"] = seed
        (target / "run.json").write_text(json.dumps(record))
    shutil.copy(held_out_run / "metrics.jsonl", models_dir / "student-kd-seed0" / "metrics.jsonl")

    ordered = [m for role in plan.ROLE_LABELS for m in roles[role]]
    examples, records = scored_records(ordered, [None], rows=10, seed=2)
    report = eval_report.assemble(
        "generate", tiny.test, examples, None, records, ordered, roles["student-kd"][0],
        {"protocol": {**greedy_protocol_record([]), "name": "greedy", "do_sample": False},
         "predictions": None},
        groups=dict(roles), comparisons=plan.COMPARISONS,
    )  # fmt: skip
    eval_report.write_outputs(report, records, out / "eval" / "report.json")
    stages = {
        "distill delta (seed 0)": {"command": "deltakd distill --cache c --objective delta"},
        "eval": {"command": "deltakd eval --model a --group 'x=a,b' --compare x:y"},
    }
    summary = {
        "tool": "deltakd", "options": {"out": str(out)}, "roles": roles, "stages": stages,
        "protocol": report["protocol"], "results": results_table(report),
        "report": str(out / "eval" / "report.json"),
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    outputs.write_marker(out, "pipeline", ["summary.json", "models", "eval"])
    return out


# ----------------------------------------------------------------------------- reading back


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def number(text: str) -> float | None:
    return None if text == "" else float(text)


def points(text: str) -> list[float]:
    return [float(value) for value in text.split(";")] if text else []


def metrics_lines(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return lines


def assert_valid_png(path: Path) -> None:
    from matplotlib import image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = image.imread(path)
    height, width = pixels.shape[:2]
    assert 200 <= width <= 2000 and 150 <= height <= 3000, (path, pixels.shape)
    assert pixels.std() > 0.01, f"{path} is blank"


class PageParser(HTMLParser):
    """The page's img sources and the text of its tables' cells."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.cells: list[str] = []
        self.scripts = 0
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag in ("td", "th"):
            self._in_cell = True
            self.cells.append("")
        if tag in ("script", "link", "iframe"):
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data


def parse_page(path: Path) -> tuple[PageParser, str]:
    text = path.read_text()
    parser = PageParser()
    parser.feed(text)
    return parser, text


# ----------------------------------------------------------------------------- tests


def test_runs_and_an_eval_report(distill_run, held_out_run, plain_report, tmp_path):
    out = tmp_path / "report"
    result = run_cli(["report", distill_run, held_out_run, plain_report, "--out", out])
    assert result.exit_code == 0, result.output
    assert f"report:{out / 'index.html'}" in "".join(result.output.split())  # rich may wrap it
    for name in ("loss.png", "rougeL.png", "differences.png"):
        assert_valid_png(out / name)

    # loss.csv: exactly the numbers of each metrics.jsonl, step by step
    rows = read_csv(out / "loss.csv")
    assert list(rows[0]) == ["run", "step", "loss", "eval_loss"]
    delta = [r for r in rows if r["run"] == "delta"]
    logged = metrics_lines(distill_run / "metrics.jsonl")
    assert [int(r["step"]) for r in delta] == [line["step"] for line in logged] == [1, 2, 3, 4]
    assert [float(r["loss"]) for r in delta] == [line["loss"] for line in logged]
    assert all(r["eval_loss"] == "" for r in delta)
    in_progress = {int(r["step"]): r for r in rows if r["run"] == "kd-in-progress"}
    assert sorted(in_progress) == list(range(1, 9))
    expected_loss, expected_eval = {}, {}
    for line in metrics_lines(held_out_run / "metrics.jsonl"):  # a step logged twice: the last
        if "loss" in line:
            expected_loss[line["step"]] = line["loss"]
        if "eval_loss" in line:
            expected_eval[line["step"]] = line["eval_loss"]
    assert {s: float(r["loss"]) for s, r in in_progress.items()} == expected_loss
    assert {s: float(r["eval_loss"]) for s, r in in_progress.items() if r["eval_loss"]} == (
        expected_eval
    )
    assert expected_loss[8] == 0.123456789
    assert [s for s, r in in_progress.items() if r["eval_loss"]] == [3, 6]

    # rougeL.csv and differences.csv: the report's own numbers
    report = json.loads(plain_report.read_text())
    scores = read_csv(out / "rougeL.csv")
    assert [r["name"] for r in scores] == [m["name"] for m in report["models"]]
    assert [r["label"] for r in scores] == ["sft", "kd", "delta"]
    for row, model in zip(scores, report["models"], strict=True):
        assert float(row["mean"]) == model["mean"]["rougeL"]
        assert float(row["std"]) == model["std"]["rougeL"]
        assert points(row["points"]) == [s["rougeL"] for s in model["per_seed"]]
        assert row["spread"] == row["points_are"] == "eval seeds"
        assert int(row["runs"]) == 2 and int(row["rows"]) == 12
    differences = read_csv(out / "differences.csv")
    expected = [d for d in report["differences"] if d["metric"] == "rougeL"]
    assert len(differences) == len(expected) == 2
    per_seed = {m["name"]: [s["rougeL"] for s in m["per_seed"]] for m in report["models"]}
    for row, entry in zip(differences, expected, strict=True):
        assert (row["model"], row["minus"]) == (entry["model"], entry["minus"])
        for key in ("difference", "ci_low", "ci_high", "confidence"):
            assert float(row[key]) == entry[key], key
        assert row["beyond_noise"] == ("yes" if entry["beyond_noise"] else "no")
        model, base = per_seed[entry["model"]], per_seed[entry["minus"]]
        assert points(row["points"]) == [a - b for a, b in zip(model, base, strict=True)]

    # the page: every plot, the tables' numbers as shown, the command that made the run
    parser, text = parse_page(out / "index.html")
    assert parser.images == ["loss.png", "rougeL.png", "differences.png"]
    assert parser.scripts == 0 and "http" not in text
    cells = parser.cells
    for model in report["models"]:
        assert f"{model['mean']['rougeL']:.2f} ± {model['std']['rougeL']:.2f}" in cells
    for entry in expected:
        assert f"{entry['difference']:+.2f}" in cells
        assert f"[{entry['ci_low']:+.2f}, {entry['ci_high']:+.2f}]" in cells
    assert "in progress (no run.json yet)" in cells and "finished" in cells
    record = json.loads((distill_run / "run.json").read_text())
    assert f"deltakd distill --cache {record['options']['cache']} --student" in text
    assert f"--out {distill_run}" in text and "--max-steps 4" in text
    assert "protocol minillm: sampling T=1.0" in text
    for name in ("loss.csv", "rougeL.csv", "differences.csv"):
        assert f'href="{name}"' in text


def test_a_pipeline_directory_by_role(pipeline_dir, tmp_path):
    out = tmp_path / "report"
    result = run_cli(["report", pipeline_dir, "--out", out])
    assert result.exit_code == 0, result.output
    for name in ("loss.png", "rougeL.png", "differences.png"):
        assert_valid_png(out / name)
    report = json.loads((pipeline_dir / "eval" / "report.json").read_text())

    runs = {r["run"] for r in read_csv(out / "loss.csv")}
    assert runs == {"Delta-KD student, seed 0", "Delta-KD student, seed 1", "KD student, seed 0"}

    labels = {role: label for role, label in plan.ROLE_LABELS.items()}
    scores = read_csv(out / "rougeL.csv")
    assert [r["name"] for r in scores] == [g["name"] for g in report["groups"]]
    for row, group in zip(scores, report["groups"], strict=True):
        assert row["label"] == labels[group["name"]]
        assert float(row["mean"]) == group["mean"]
        assert number(row["std"]) == group["std"]
        if len(group["models"]) > 1:
            assert points(row["points"]) == group["per_model"]
            assert row["spread"] == row["points_are"] == "training seeds"
        else:  # one greedy run: no spread at all
            assert row["std"] == row["points"] == row["spread"] == ""

    differences = read_csv(out / "differences.csv")
    assert len(differences) == len(report["group_differences"]) == len(plan.COMPARISONS)
    for row, entry in zip(differences, report["group_differences"], strict=True):
        assert row["label"] == f"{labels[entry['model']]} - {labels[entry['minus']]}"
        for key in ("difference", "ci_low", "ci_high"):
            assert float(row[key]) == entry[key], key
        assert points(row["points"]) == entry.get("per_model_differences", [])
    assert points(differences[0]["points"])  # students with two seeds: per-seed differences

    parser, text = parse_page(out / "index.html")
    assert "Delta-KD student" in parser.cells and "2 training seeds" in parser.cells
    for entry in report["group_differences"]:
        per = ", ".join(f"{d:+.2f}" for d in entry.get("per_model_differences", [])) or "-"
        assert per in parser.cells
    assert "deltakd eval --model a --group &#x27;x=a,b&#x27; --compare x:y" in text  # escaped
    assert "protocol greedy: greedy decoding" in text


def test_a_pipeline_still_running_and_two_pipelines_side_by_side(pipeline_dir, tmp_path):
    running = tmp_path / "running"  # no summary.json, no eval yet: the runs by directory name
    shutil.copytree(pipeline_dir / "models", running / "models")
    outputs.write_marker(running, "pipeline")
    out = tmp_path / "report"
    result = run_cli(["report", running, pipeline_dir, "--out", out])
    assert result.exit_code == 0, result.output
    roles = ["Delta-KD student, seed 0", "Delta-KD student, seed 1", "KD student, seed 0"]
    names = ["student-delta-seed0", "student-delta-seed1", "student-kd-seed0"]  # no labels yet
    runs = [r["run"] for r in read_csv(out / "loss.csv")]
    assert sorted(set(runs)) == sorted(names + roles)  # distinct names need no DIR prefix
    assert len(read_csv(out / "rougeL.csv")) == len(plan.ROLE_LABELS)  # the finished one's


def test_a_directory_with_no_runs_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(["report", empty, "--out", tmp_path / "r"])
    assert_one_line_error(result, f"no runs in {empty}", "run.json or metrics.jsonl",
                          "REPORT.json", "summary.json", "it is empty")  # fmt: skip
    (empty / "notes.txt").write_text("hello")
    result = run_cli(["report", empty, "--out", tmp_path / "r"])
    assert_one_line_error(result, f"no runs in {empty}", "it holds notes.txt")
    result = run_cli(["report", empty / "notes.txt", "--out", tmp_path / "r"])
    assert_one_line_error(result, "is a file but not an eval report")
    result = run_cli(["report", tmp_path / "missing", "--out", tmp_path / "r"])
    assert_one_line_error(result, "missing not found")
    assert not (tmp_path / "r").exists()


def test_out_never_an_input(distill_run, plain_report, tmp_path):
    result = run_cli(["report", distill_run, "--out", distill_run])
    assert_one_line_error(result, "is the same path as DIR")
    result = run_cli(["report", distill_run, "--out", distill_run / "report"])
    assert_one_line_error(result, "is inside DIR")
    result = run_cli(["report", plain_report, "--out", plain_report])
    assert_one_line_error(result, "is the same path as DIR")
    assert not (distill_run / "report").exists()


def test_rerun_replaces_our_report_and_foreign_directories_are_refused(
    distill_run, plain_report, tmp_path
):
    out = tmp_path / "report"
    assert run_cli(["report", distill_run, plain_report, "--out", out]).exit_code == 0
    first = (out / "loss.png").read_bytes()
    # a file of the user's in the report's folder: refused naming it, nothing touched
    (out / "mine.txt").write_text("a note of my own")
    result = run_cli(["report", distill_run, "--out", out])
    assert_one_line_error(result, "did not create (mine.txt)")
    assert (out / "mine.txt").read_text() == "a note of my own" and (out / "rougeL.png").exists()
    (out / "mine.txt").unlink()
    # the same report again: replaced, byte for byte the same picture
    result = run_cli(["report", distill_run, "--out", out])
    assert result.exit_code == 0, result.output
    assert (out / "loss.png").read_bytes() == first
    # the eval's plots of the first report are gone (they are no longer in it)
    assert not (out / "rougeL.png").exists() and not (out / "differences.csv").exists()
    assert outputs.read_marker(out)["kind"] == "report"
    assert set(outputs.read_marker(out)["files"]) == {"loss.png", "loss.csv", "index.html"}

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("not deltakd's")
    for overwrite in ([], ["--overwrite"]):
        result = run_cli(["report", distill_run, "--out", foreign, *overwrite])
        assert_one_line_error(result, "did not create (data.txt)", "--overwrite never touches")
    assert sorted(p.name for p in foreign.iterdir()) == ["data.txt"]


def test_without_matplotlib_one_line(distill_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    result = run_cli(["report", distill_run, "--out", tmp_path / "r"])
    assert_one_line_error(result, "deltakd report needs matplotlib: pip install 'deltakd[report]'")
    assert not (tmp_path / "r").exists()


def test_command_lines_come_back_from_records():
    record = {
        "command": "distill",
        "options": {"cache": "c", "student": "s", "out": "o d", "objective": "kd", "lr": 1e-3},
    }
    assert collect.command_line(record) == (
        "deltakd distill --cache c --student s --out 'o d' --objective kd --lr 0.001 --batch-size 8"
    )
    other = {"command": "distill", "options": {"cache": "c", "an_option_of_later": 1}}
    assert collect.command_line(other).startswith("deltakd distill (options: {")


def test_labels_are_text_never_mathtext(held_out_run, tmp_path):
    """Issue 22: a run directory named with `$...$` crashed `deltakd report` in matplotlib's
    mathtext parser."""
    named = tmp_path / "run $x^{$ 50%"
    shutil.copytree(held_out_run, named)
    result = run_cli(["report", named, "--out", tmp_path / "r"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "loss.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("extremes", [(1e308,), (-1e308,), (1e308, -1e308), (1e308, 1e-308)])
def test_extreme_losses_are_drawn_or_skipped_with_a_note(held_out_run, tmp_path, extremes):
    """Issue 22: a crafted ±1e308 loss crashed `deltakd report` in matplotlib."""
    run = tmp_path / "run"
    shutil.copytree(held_out_run, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    for index, extreme in enumerate(extremes, start=1):
        entry = json.loads(lines[index])
        entry["loss"] = extreme
        lines[index] = json.dumps(entry)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = run_cli(["report", run, "--out", tmp_path / "r"])
    assert result.exit_code == 0, result.output
    assert_valid_png(tmp_path / "r" / "loss.png")
    beyond = sum(abs(value) > 3.4028234e38 for value in extremes)
    assert (f"run: {beyond} loss value(s) beyond" in flat(result.output)) == (beyond > 0)
    shown = [number(row["loss"]) for row in read_csv(tmp_path / "r" / "loss.csv")]
    assert all(value in shown for value in extremes)  # the numbers stay in the table


# ----------------------------------------------------------------------------- issue 27


def _run(label: str, record: dict | None, scale: float = 1.0) -> collect.Run:
    points = [collect.LossPoint(step, loss=scale / step) for step in range(1, 6)]
    return collect.Run(label, Path(label), points, None, record is not None, "", record)


def test_one_loss_axis_per_kind_of_loss():
    """Issue 27: loss.png drew SFT cross-entropy and KD's divergence on one axis."""
    runs = [
        _run("sft", {"command": "distill", "options": {"objective": "sft"}}, 3.0),
        _run("tuned", {"command": "finetune", "options": {}}, 2.0),
        _run("kd", {"command": "distill", "options": {"objective": "kd"}}, 0.5),
        _run("delta a", {"command": "distill", "options": {"objective": "delta"}}),
        _run("delta b", {"command": "distill", "options": {"objective": "delta"}}),
        _run("running", None),
    ]
    figure = plots.loss_figure(runs)
    drawn = [sorted(line.get_label() for line in axes.get_lines()) for axes in figure.axes]
    assert drawn == [["sft", "tuned"], ["kd"], ["delta a", "delta b"], ["running"]]
    titles = [axes.get_title() for axes in figure.axes]
    assert "cross-entropy" in titles[0] and titles[1].startswith("kd:")
    assert "not recorded" in titles[3]


def _overlaps(one, other) -> bool:
    return not (
        one.x1 <= other.x0 or other.x1 <= one.x0 or one.y1 <= other.y0 or other.y1 <= one.y0
    )


def test_legends_cover_nothing(plain_report, pipeline_dir):
    """Issue 27: rougeL.png's legend covered a row. Every legend of every figure lies outside
    every axes of its figure."""
    evaluations = collect.collect([plain_report, pipeline_dir]).evaluations
    runs = [_run("kd", {"command": "distill", "options": {"objective": "kd"}})]
    figures = [
        plots.loss_figure(runs),
        plots.rouge_figure(evaluations),
        plots.differences_figure(evaluations),
    ]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    checked = 0
    for figure in figures:
        renderer = FigureCanvasAgg(figure).get_renderer()
        figure.draw(renderer)
        for axes in figure.axes:
            legend = axes.get_legend()
            if legend is None:
                continue
            box = legend.get_window_extent(renderer)
            assert all(not _overlaps(box, a.get_window_extent(renderer)) for a in figure.axes)
            assert 0 <= box.x0 and box.x1 <= figure.bbox.x1 + 1  # and inside the picture
            checked += 1
    assert checked >= 4


def test_the_page_is_worth_sending(distill_run, plain_report, tmp_path):
    """Issue 27: the cache's facts (from its manifest), each run's objective and settings (from
    run.json, the default objective too), a few generations side by side, short labels with the
    paths in footnotes."""
    out = tmp_path / "report"
    assert run_cli(["report", distill_run, plain_report, "--out", out]).exit_code == 0
    parser, text = parse_page(out / "index.html")
    record = json.loads((distill_run / "run.json").read_text())
    manifest = json.loads((Path(record["options"]["cache"]) / "manifest.json").read_text())

    facts = dict(zip(parser.cells[::2], parser.cells[1::2], strict=False))
    assert facts["exact head per position (k)"] == str(manifest["top_k"]) == "8"
    tail = manifest.get("tail_samples") or 0
    assert facts["tail draws per position"].startswith(str(tail))
    assert facts["bytes per response token"] == f"{manifest['bytes_per_response_token']:.1f}"
    assert facts["examples / response tokens"] == (
        f"{manifest['counts']['examples']} / {manifest['counts']['response_tokens']}"
    )

    settings = next(cell for cell in parser.cells if cell.startswith("objective delta"))
    options = record["options"]
    assert settings.startswith(f"objective delta, alpha {options['alpha']:g}, ")
    assert f"steps {record['resolved']['total_steps']}" in settings
    assert f"lr {options['lr']:g}" in settings and f"seed {options['seed']}" in settings
    assert "--objective delta" in text  # the default objective is named in the command too

    assert not any(str(distill_run) in cell for cell in parser.cells)  # paths only in notes
    assert "delta [1]" in parser.cells and f"<li>{distill_run}</li>" in text

    generations = [json.loads(line) for line in
                   eval_report.generations_path(plain_report).read_text().splitlines()]  # fmt: skip
    for row in range(collect.EXAMPLES):
        first = {}
        for entry in generations:
            if entry["row"] == row:
                first.setdefault(entry["model"], entry["prediction"])
        assert len(first) == 3
        for prediction in first.values():
            assert prediction in parser.cells
