"""What a report shows, read from the files the other commands write (no plotting here):

- a training run directory (`distill`, `finetune`): `metrics.jsonl` (a line per logged step with
  "loss"; held-out lines with "eval_loss") and `run.json` (the command and its options); a run
  still in progress has no run.json yet and is read from metrics.jsonl alone;
- an eval report (`eval --out REPORT.json`, or `report.json` in a directory): ROUGE-L per model
  or group and the paired differences, exactly as eval computed them;
- a pipeline directory (`pipeline`, `demo`): `summary.json` (roles, their labels, each stage's
  command), `eval/report.json` (the numbers) and the training runs under `models/*/`.

Every number is copied, never recomputed, except the per-eval-seed differences of a model and the
baseline (one subtraction per seed, when both ran the same seeds)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltakd_cli.errors import DeltakdError
from deltakd_cli.evaluate.report import protocol_line
from deltakd_cli.evaluate.stats import read_difference
from deltakd_cli.options import to_argv
from deltakd_cli.outputs import MARKER, read_marker
from deltakd_cli.train.options import DistillOptions, FinetuneOptions

METRIC = "rougeL"
LOOKED_FOR = (
    "run.json or metrics.jsonl (a training run), a REPORT.json eval report (the file, or "
    "report.json in the directory) or summary.json (a pipeline directory)"
)
# The options class of each command whose run writes a run.json (to give its command line back).
OPTIONS_OF = {"distill": DistillOptions, "finetune": FinetuneOptions}


@dataclass
class LossPoint:
    """One logged step of a run: its training loss and/or its held-out loss."""

    step: int
    loss: float | None = None
    eval_loss: float | None = None


@dataclass
class Run:
    """A training run's curves and the command that made it."""

    label: str
    path: Path
    points: list[LossPoint]
    command: str | None  # None while the run is in progress (no run.json yet)
    finished: bool
    source: str = ""  # the DIR it was found under, as the user wrote it
    record: dict[str, Any] | None = None  # its run.json, once finished

    @property
    def options(self) -> dict[str, Any]:
        options = (self.record or {}).get("options")
        return options if isinstance(options, dict) else {}

    @property
    def objective(self) -> str | None:
        """What its loss is: the distill objective, "sft" for finetune (cross-entropy), None
        while the run is in progress (nothing recorded yet)."""
        if self.record is None:
            return None
        if self.record.get("command") == "finetune":
            return "sft"
        return str(self.options.get("objective") or "sft")

    @property
    def settings(self) -> list[tuple[str, str]]:
        """How it was trained, from its run.json (never reconstructed): the objective and its
        settings, then the training settings a reader compares runs by."""
        if self.record is None:
            return []
        from deltakd_cli.train.card import objective_settings

        options, resolved = self.options, self.record.get("resolved") or {}
        pairs = objective_settings({**options, "objective": self.objective})
        if self.record.get("command") == "finetune":
            pairs[0] = ("objective", "sft (finetune)")
        if resolved.get("tail"):
            pairs.append(("tail", resolved["tail"]))
        pairs.append(("steps", resolved.get("total_steps", options.get("max_steps"))))
        for name in ("epochs", "lr", "batch_size", "seed"):
            if options.get(name) is not None:
                pairs.append((name.replace("_", " "), options[name]))
        if options.get("lora_r"):
            pairs.append(("LoRA r", options["lora_r"]))
        return [(name, _setting(value)) for name, value in pairs]

    @property
    def training(self) -> list[tuple[int, float]]:
        return [(p.step, p.loss) for p in self.points if p.loss is not None]

    @property
    def held_out(self) -> list[tuple[int, float]]:
        return [(p.step, p.eval_loss) for p in self.points if p.eval_loss is not None]


@dataclass
class Score:
    """One line of the ROUGE-L table: a model, or a group of models (a pipeline's role)."""

    label: str
    name: str  # the model (as eval was given it) or the group
    mean: float
    std: float | None  # a spread over `spread`, not a confidence interval
    spread: str | None  # "eval seeds", "training seeds", "models" or None (one run)
    runs: int
    rows: int
    points: list[float] = field(default_factory=list)  # each seed's / model's score
    points_are: str | None = None


@dataclass
class Difference:
    """A paired difference `model - minus` with its bootstrap interval."""

    label: str
    model: str
    minus: str
    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    beyond_noise: bool  # the interval excludes 0
    points: list[float] = field(default_factory=list)  # per seed / per model differences
    points_are: str | None = None


@dataclass
class Generated:
    """One test row with what each model (or group's first model) generated for it."""

    row: int
    id: str
    prompt: str
    reference: str
    predictions: list[tuple[str, str]]  # (label, text), in the table's order


@dataclass
class Evaluation:
    """The numbers of one eval report."""

    source: str
    path: Path
    scores: list[Score]
    differences: list[Difference]
    protocol: str
    confidence: float
    differences_are: str  # "groups" (the asked-for comparisons) or "baseline"
    examples: list[Generated] = field(default_factory=list)


@dataclass
class CacheFacts:
    """A teachers' cache the runs trained from, as its manifest describes it (read through the
    cache's own reader); `problem` says why it could not be read here (moved, deleted)."""

    path: str  # as run.json records it
    used_by: list[str]
    facts: dict[str, Any] | None
    problem: str | None = None


@dataclass
class ScoredSweepPoint:
    """One point of a pipeline's --sweep: its test score (and spread over training seeds), its
    validation score (what chose), and its paired difference to SFT on test."""

    role: str
    label: str
    gamma: float
    alpha: float
    validation: float
    test: Score
    versus_sft: Difference | None
    chosen: bool


@dataclass
class Sweep:
    source: str
    points: list[ScoredSweepPoint]
    validation_rows: int


@dataclass
class Collected:
    """Everything a report shows, from every DIR."""

    runs: list[Run] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    sweeps: list[Sweep] = field(default_factory=list)
    commands: list[tuple[str, str]] = field(default_factory=list)  # (what, command line)
    caches: list[CacheFacts] = field(default_factory=list)
    sources: list[tuple[str, str]] = field(default_factory=list)  # (DIR, what it was read as)


# ----------------------------------------------------------------------------- small readers


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DeltakdError(f"cannot read {path}: {error}") from None


def is_eval_report(path: Path) -> bool:
    """A JSON file written by `deltakd eval --out`."""
    if not path.is_file():
        return False
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (
        isinstance(report, dict)
        and (report.get("tool") or {}).get("name") == "deltakd"
        and isinstance(report.get("models"), list)
    )


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _setting(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def read_metrics(path: Path) -> list[LossPoint]:
    """The loss curves of a metrics.jsonl: "loss" lines (training) and "eval_loss" lines
    (held-out), one point per step in step order. A line cut by a kill, or a value that is not a
    finite number, is left out; a step logged twice keeps its last value (as a resume does)."""
    points: dict[int, LossPoint] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DeltakdError(f"cannot read {path}: {error}") from None
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            continue
        step = entry["step"]
        loss, eval_loss = _finite(entry.get("loss")), _finite(entry.get("eval_loss"))
        if loss is None and eval_loss is None:
            continue
        point = points.setdefault(step, LossPoint(step))
        if loss is not None:
            point.loss = loss
        if eval_loss is not None:
            point.eval_loss = eval_loss
    return [points[step] for step in sorted(points)]


def command_line(record: dict[str, Any]) -> str | None:
    """`deltakd COMMAND FLAGS` from a run's record: the options object is rebuilt with the
    command's options class so only what differs from the defaults shows; a record it does not
    fit (another version) is shown as its options."""
    command = record.get("command")
    options = record.get("options")
    if not isinstance(command, str) or not isinstance(options, dict):
        return None
    cls = OPTIONS_OF.get(command)
    if cls is not None:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            if set(options) <= names:
                argv = to_argv(cls(**options))
                if command == "distill" and "--objective" not in argv:
                    argv += ["--objective", str(options.get("objective", "delta"))]
                return "deltakd " + shlex.join([command, *argv])
        except (TypeError, ValueError):
            pass
    return f"deltakd {command} (options: {json.dumps(options, sort_keys=True, default=str)})"


def read_run(path: Path, label: str, source: str = "") -> Run:
    """A training run directory: its metrics.jsonl and, once finished, its run.json."""
    metrics = path / "metrics.jsonl"
    points = read_metrics(metrics) if metrics.is_file() else []
    record_path = path / "run.json"
    record = _read_json(record_path) if record_path.is_file() else None
    finished = record is not None
    if not isinstance(record, dict):
        record = None
    command = command_line(record) if record is not None else None
    return Run(label, path, points, command, finished, source, record)


# ----------------------------------------------------------------------------- eval reports


def short_names(names: list[str]) -> dict[str, str]:
    """Models by their last path component when that names each one apart, else as given."""
    short = [Path(name).name or name for name in names]
    if len(set(short)) == len(short):
        return dict(zip(names, short, strict=True))
    return {name: name for name in names}


def _per_seed(model: dict[str, Any]) -> dict[Any, float]:
    return {entry["seed"]: entry[METRIC] for entry in model.get("per_seed", [])}


def read_eval_report(
    report: dict[str, Any],
    path: Path,
    source: str,
    labels: dict[str, str] | None = None,
    spread_names: dict[str, str] | None = None,
) -> Evaluation:
    """The ROUGE-L lines and paired differences of an eval report. With groups (eval --group, as
    the pipeline runs it) a line per group and the asked-for group differences; otherwise a line
    per model and each model's difference from the baseline. `labels` rename groups or models
    (a pipeline's roles), `spread_names` rename what a std is over ("models" -> "training
    seeds")."""
    try:
        models = {model["name"]: model for model in report["models"]}
        labels = {**short_names(list(models)), **(labels or {})}
        spread_names = spread_names or {}
        confidence = float((report.get("bootstrap") or {}).get("confidence", 0.95))
        scores: list[Score] = []
        differences: list[Difference] = []
        groups = report.get("groups") or []
        group_differences = report.get("group_differences") or []
        if groups:
            for group in groups:
                members = group["models"]
                if len(members) > 1:
                    points, points_are = list(group["per_model"]), "models"
                else:
                    member = models[members[0]]
                    per_seed = list(_per_seed(member).values())
                    points = per_seed if len(per_seed) > 1 else []
                    points_are = "eval seeds" if points else None
                spread = group["spread"]
                scores.append(
                    Score(
                        label=labels.get(group["name"], group["name"]),
                        name=group["name"],
                        mean=group["mean"],
                        std=group["std"],
                        spread=spread_names.get(spread, spread) if spread else None,
                        runs=group["runs"],
                        rows=group["rows"],
                        points=points,
                        points_are=spread_names.get(points_are, points_are),
                    )
                )
        else:
            for name, model in models.items():
                per_seed = list(_per_seed(model).values())
                std = model["std"][METRIC]
                scores.append(
                    Score(
                        label=labels[name],
                        name=name,
                        mean=model["mean"][METRIC],
                        std=std,
                        spread="eval seeds" if std is not None else None,
                        runs=model["n_seeds"],
                        rows=model["n_rows"],
                        points=per_seed if len(per_seed) > 1 else [],
                        points_are="eval seeds" if len(per_seed) > 1 else None,
                    )
                )
        if group_differences:
            differences_are = "groups"
            for entry in map(read_difference, group_differences):
                points = list(entry.get("per_model_differences") or [])
                difference = _difference(entry, entry["minus"], labels, confidence)
                if points:
                    difference.points = points
                    difference.points_are = spread_names.get("models", "models")
                differences.append(difference)
        else:
            differences_are = "baseline"
            for entry in map(read_difference, report.get("differences") or []):
                if entry["metric"] != METRIC:
                    continue
                difference = _difference(entry, entry["minus"], labels, confidence)
                model = _per_seed(models[entry["model"]])
                baseline = _per_seed(models[entry["minus"]])
                if len(model) > 1 and list(model) == list(baseline):
                    difference.points = [model[seed] - baseline[seed] for seed in model]
                    difference.points_are = "eval seeds"
                differences.append(difference)
        data = report.get("data") or {}
        rows = data.get("rows", scores[0].rows if scores else 0)
        protocol = protocol_line(report.get("protocol"), rows)
        shown = {
            score.label: (next(g["models"][0] for g in groups if g["name"] == score.name)
                          if groups else score.name)
            for score in scores
        }  # fmt: skip
    except (KeyError, TypeError, IndexError, ValueError, StopIteration) as error:
        raise DeltakdError(
            f"{path} is not an eval report this version of deltakd reads "
            f"({type(error).__name__}: {error})"
        ) from None
    examples = read_examples(path, report.get("generations_file"), shown)
    return Evaluation(
        source, path, scores, differences, protocol, confidence, differences_are, examples
    )


EXAMPLES = 3  # test rows shown with every model's generation


def read_examples(
    report_path: Path, generations_file: Any, shown: dict[str, str], count: int = EXAMPLES
) -> list[Generated]:
    """The first `count` rows of the report's generations file, each with the generation of
    every model in `shown` (label -> model; a group by its first model) at its first seed.
    Nothing when the file is not next to the report (an eval report copied alone)."""
    if not isinstance(generations_file, str) or "/" in generations_file:
        return []
    path = report_path.parent / generations_file
    if not path.is_file():
        return []
    firsts: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                key = (record["model"], record["row"])
                if record["row"] < count and key not in firsts:
                    firsts[key] = record
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise DeltakdError(f"cannot read {path}: {error}") from None
    examples = []
    for row in range(count):
        present = [(label, firsts.get((model, row))) for label, model in shown.items()]
        records = [(label, record) for label, record in present if record is not None]
        if not records:
            break
        first = records[0][1]
        examples.append(
            Generated(
                row=row,
                id=str(first.get("id", row)),
                prompt=str(first.get("prompt", "")),
                reference=str((first.get("references") or [""])[0]),
                predictions=[(label, str(record["prediction"])) for label, record in records],
            )
        )
    return examples


def _difference(
    entry: dict[str, Any], minus: str, labels: dict[str, str], confidence: float
) -> Difference:
    model = entry["model"]
    return Difference(
        label=f"{labels.get(model, model)} - {labels.get(minus, minus)}",
        model=model,
        minus=minus,
        difference=entry["difference"],
        ci_low=entry["ci_low"],
        ci_high=entry["ci_high"],
        confidence=float(entry.get("confidence", confidence)),
        beyond_noise=bool(entry["beyond_noise"]),
    )


# ----------------------------------------------------------------------------- pipelines


def summary_role_labels(summary: dict[str, Any] | None) -> dict[str, str]:
    """Each role's label as the pipeline's table shows it ("KD student"); a pipeline still
    running (no summary.json yet) shows its roles by name."""
    labels: dict[str, str] = {}
    rows = ((summary or {}).get("results") or {}).get("rows") or []
    labels.update({row["role"]: row["label"] for row in rows})
    return labels


def _run_label(path: Path, roles: dict[str, list[str]], labels: dict[str, str]) -> str:
    """A pipeline's model directory by its role (summary.json's roles, or, before there is one,
    the directory's name: models/ROLE or models/ROLE-seedN), with its seed when the role was
    trained with several."""
    named = re.fullmatch(r"(.+?)(?:-seed(\d+))?", path.name)
    role = next(
        (role for role, members in roles.items() if path.name in {Path(m).name for m in members}),
        named.group(1),
    )
    if role not in labels:
        return path.name
    if len(roles.get(role, [])) < 2 and named.group(2) is None:
        return labels[role]
    record = _read_json(path / "run.json") if (path / "run.json").is_file() else {}
    seed = (record.get("options") or {}).get("seed") if isinstance(record, dict) else None
    if seed is None and named.group(2) is not None:
        seed = int(named.group(2))
    return f"{labels[role]}, seed {seed}" if seed is not None else f"{labels[role]} ({path.name})"


def _pipeline_runs(directory: Path, summary: dict[str, Any] | None, source: str) -> list[Run]:
    """The training runs under models/*/ (a model without metrics.jsonl, e.g. a converted
    teacher, is not a run), labelled by their role: "KD student", "KD student, seed 3"."""
    models_dir = directory / "models"
    if not models_dir.is_dir():
        return []
    roles = (summary or {}).get("roles") or {}
    labels = summary_role_labels(summary)
    return [
        read_run(path, _run_label(path, roles, labels), source)
        for path in sorted(p for p in models_dir.iterdir() if p.is_dir())
        if (path / "metrics.jsonl").is_file()
    ]


def read_pipeline(directory: Path, source: str, collected: Collected) -> None:
    """A pipeline directory: runs under models/ labelled by role, the eval report with the
    roles' labels, every stage's command. One still running (no summary.json yet) gives what it
    has so far."""
    summary_path = directory / "summary.json"
    summary = _read_json(summary_path) if summary_path.is_file() else None
    if summary is not None and not isinstance(summary, dict):
        raise DeltakdError(f"{summary_path} is not a pipeline summary")
    try:
        runs = _pipeline_runs(directory, summary, source)
        labels = summary_role_labels(summary)
        stages = (summary or {}).get("stages") or {}
        commands = [
            (f"{source}: {name}", stage["command"])
            for name, stage in stages.items()
            if isinstance(stage, dict) and stage.get("command")
        ]
    except (KeyError, TypeError, AttributeError) as error:
        raise DeltakdError(
            f"{summary_path} is not a pipeline summary this version of deltakd reads "
            f"({type(error).__name__}: {error})"
        ) from None
    report_path = directory / "eval" / "report.json"
    if not report_path.is_file() and summary and summary.get("report"):
        report_path = Path(summary["report"])
    evaluation = None
    if is_eval_report(report_path):
        evaluation = read_eval_report(
            _read_json(report_path),
            report_path,
            source,
            labels=labels,
            spread_names={"models": "training seeds"},
        )
    elif summary is not None:
        raise DeltakdError(
            f"{directory} is a pipeline directory but its eval report is missing "
            f"({directory / 'eval' / 'report.json'})"
        )
    if not runs and evaluation is None:
        raise DeltakdError(
            f"{source}: a pipeline directory with nothing to report yet: looked for "
            f"models/*/metrics.jsonl, eval/report.json and summary.json"
        )
    collected.runs += runs
    if evaluation is not None:
        collected.evaluations.append(evaluation)
        sweep = (summary or {}).get("sweep")
        if isinstance(sweep, dict):
            collected.sweeps.append(read_sweep(sweep, evaluation, source))
    collected.commands += commands
    collected.sources.append((source, "pipeline directory"))


def read_sweep(sweep: dict[str, Any], evaluation: Evaluation, source: str) -> Sweep:
    """A pipeline summary's sweep, joined with its test evaluation by role."""
    scores = {score.name: score for score in evaluation.scores}
    versus = {d.model: d for d in evaluation.differences if d.minus == "student-sft"}
    try:
        points = [
            ScoredSweepPoint(
                role=role,
                label=scores[role].label,
                gamma=float(point["gamma"]),
                alpha=float(point["alpha"]),
                validation=float(sweep["validation"][role]),
                test=scores[role],
                versus_sft=versus.get(role),
                chosen=role == sweep["chosen"],
            )
            for role, point in sweep["points"].items()
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise DeltakdError(
            f"{source}: its summary's sweep does not match its eval report ({error})"
        ) from None
    return Sweep(source, points, int(sweep.get("validation_rows", 0)))


# ----------------------------------------------------------------------------- any DIR


def _is_pipeline(directory: Path) -> bool:
    if (directory / "summary.json").is_file():
        return True
    marker = read_marker(directory)
    return bool(marker and marker.get("kind") == "pipeline")


def collect(dirs: list[Path], names: list[str] | None = None) -> Collected:
    """Read every DIR (a training run, an eval report or a pipeline directory); a DIR that is
    none of them stops with one line naming it and what was looked for. `names` are the DIRs as
    the user wrote them (for labels and messages)."""
    names = names or [str(d) for d in dirs]
    collected = Collected()
    for directory, source in zip(dirs, names, strict=True):
        if not directory.exists():
            raise DeltakdError(f"{source} not found")
        if directory.is_file():
            if not is_eval_report(directory):
                raise DeltakdError(
                    f"{source} is a file but not an eval report written by deltakd eval; "
                    f"a DIR is {LOOKED_FOR}"
                )
            evaluation = read_eval_report(_read_json(directory), directory, source)
            collected.evaluations.append(evaluation)
            collected.sources.append((source, "eval report"))
        elif _is_pipeline(directory):
            read_pipeline(directory, source, collected)
        elif (directory / "run.json").is_file() or (directory / "metrics.jsonl").is_file():
            run = read_run(directory, directory.resolve().name, source)
            collected.runs.append(run)
            if run.command:
                collected.commands.append((run.label, run.command))
            collected.sources.append((source, "training run"))
        elif is_eval_report(directory / "report.json"):
            path = directory / "report.json"
            collected.evaluations.append(read_eval_report(_read_json(path), path, source))
            collected.sources.append((source, "eval report"))
        else:
            found = ", ".join(sorted(p.name for p in directory.iterdir() if p.name != MARKER))
            raise DeltakdError(
                f"no runs in {source}: looked for {LOOKED_FOR}"
                + (f"; it holds {found[:200]}" if found else "; it is empty")
            )
    _unique_labels(collected)
    collected.caches = read_caches(collected.runs)
    return collected


def _cache_facts(path: str, run: Run) -> tuple[dict[str, Any] | None, str | None]:
    """A cache's summary (`deltakd inspect`'s, from its manifest), found where run.json says,
    or relative to the run's directory; else why not."""
    from deltakd_cli.cache.inspect import summary
    from deltakd_cli.cache.reader import CacheReader

    places = [Path(path)] if Path(path).is_absolute() else [Path(path), run.path / path]
    for place in places:
        if place.exists():
            try:
                return summary(CacheReader(str(place))), None
            except DeltakdError as error:
                return None, str(error)
    return None, "not found here (moved or deleted since the run)"


def read_caches(runs: list[Run]) -> list[CacheFacts]:
    """Every cache the finished distill runs trained from, once each."""
    caches: dict[str, CacheFacts] = {}
    for run in runs:
        path = run.options.get("cache")
        if not isinstance(path, str) or not path:
            continue
        if path not in caches:
            facts, problem = _cache_facts(path, run)
            caches[path] = CacheFacts(path, [], facts, problem)
        caches[path].used_by.append(run.label)
    return list(caches.values())


def _unique_labels(collected: Collected) -> None:
    """Two runs of the same name (two pipelines' "KD student", two runs called "delta") are
    named by their DIR as written (in front of a pipeline's role), then numbered, so every curve
    and CSV row names one run."""
    counts: dict[str, int] = {}
    for run in collected.runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    seen: set[str] = set()
    for run in collected.runs:
        label = run.label
        if counts[label] > 1 and run.source:
            label = (
                run.source if run.source.rstrip("/").endswith(label) else f"{run.source}: {label}"
            )
        base, number = label, 2
        while label in seen:
            label, number = f"{base} ({number})", number + 1
        seen.add(label)
        run.label = label
