"""What the API's functions return: typed, and named as the files on disk name things.

One vocabulary, shared with REPORT.json and summary.json (docs/evaluation.md): a model has a
`label` (its `NAME=` label, or its path when it has none) and a `path`; a difference is `model`
minus `minus`, with its interval (`ci_low`, `ci_high`), `beyond_noise` when the interval
excludes 0, and `per_model_differences` when both sides have as many models (a student's
training seeds). Each result keeps the file's whole record as `record`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Difference:
    """`model` minus `minus` (labels), mean over rows, with a paired bootstrap interval."""

    model: str
    minus: str
    metric: str
    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    beyond_noise: bool
    per_model_differences: list[float] = field(default_factory=list)

    @classmethod
    def from_record(cls, entry: dict[str, Any], labels: dict[str, str]) -> Difference:
        from deltakd_cli.evaluate.stats import read_difference

        entry = read_difference(entry)
        return cls(
            model=labels.get(entry["model"], entry["model"]),
            minus=labels.get(entry["minus"], entry["minus"]),
            metric=entry.get("metric", "rougeL"),
            difference=entry["difference"],
            ci_low=entry["ci_low"],
            ci_high=entry["ci_high"],
            confidence=entry["confidence"],
            beyond_noise=bool(entry["beyond_noise"]),
            per_model_differences=list(entry.get("per_model_differences") or []),
        )


@dataclass(frozen=True)
class ModelScore:
    """One model's scores: the mean over eval seeds of each metric (x100), their std."""

    label: str
    path: str
    rouge_l: float
    std: float | None
    mean: dict[str, float]
    rows: int
    seeds: int


@dataclass(frozen=True)
class GroupScore:
    """One group of models (e.g. a student trained with several seeds; a labelled model is a
    group of one): the mean ROUGE-L of its models and their spread."""

    label: str
    paths: list[str]
    rouge_l: float
    std: float | None
    spread: str | None  # what the std is over: "models" (training seeds) or "eval seeds"
    per_model: list[float]


@dataclass(frozen=True)
class Evaluation:
    """What `deltakd.evaluate` returns (the report REPORT.json holds, typed)."""

    models: list[ModelScore]
    groups: list[GroupScore]
    differences: list[Difference]  # every other model minus the baseline, per metric
    group_differences: list[Difference]  # the asked-for comparisons (compare=)
    baseline: str
    protocol: dict[str, Any] | None
    path: Path | None  # REPORT.json when out= was given
    record: dict[str, Any] = field(repr=False)

    @classmethod
    def from_record(cls, report: dict[str, Any], path: Path | None = None) -> Evaluation:
        labels = dict(report.get("labels") or {})
        models = [
            ModelScore(
                label=model.get("label") or labels.get(model["name"]) or model["name"],
                path=model["name"],
                rouge_l=model["mean"]["rougeL"],
                std=model["std"].get("rougeL"),
                mean=dict(model["mean"]),
                rows=model["n_rows"],
                seeds=model["n_seeds"],
            )
            for model in report["models"]
        ]
        groups = [
            GroupScore(
                label=labels.get(line["name"], line["name"]),
                paths=list(line["models"]),
                rouge_l=line["mean"],
                std=line["std"],
                spread=line["spread"],
                per_model=list(line["per_model"]),
            )
            for line in report.get("groups") or []
        ]
        return cls(
            models=models,
            groups=groups,
            differences=[Difference.from_record(d, labels) for d in report["differences"]],
            group_differences=[
                Difference.from_record(d, labels) for d in report.get("group_differences") or []
            ],
            baseline=labels.get(report["baseline"], report["baseline"]),
            protocol=report.get("protocol"),
            path=path,
            record=report,
        )

    def score(self, label: str) -> ModelScore:
        """The model of this label (or path)."""
        for model in self.models:
            if label in (model.label, model.path):
                return model
        raise KeyError(label)

    def table(self) -> str:
        """ROUGE-L per group (with groups) or per model, then the asked-for differences (or
        those from the baseline), as plain text."""
        shown = [(g.label, g.rouge_l, g.std, f"{len(g.paths)} models" if len(g.paths) > 1
                  else "") for g in self.groups] or [
            (m.label, m.rouge_l, m.std, "") for m in self.models]  # fmt: skip
        width = max(len(label) for label, *_ in shown)
        lines = [f"{'model':<{width}}  ROUGE-L"]
        for label, score, std, note in shown:
            spread = f" ± {std:.2f}" if std is not None else ""
            lines.append(f"{label:<{width}}  {score:7.2f}{spread}  {note}".rstrip())
        for entry in self.group_differences or self.differences:
            if entry.metric != "rougeL":
                continue
            verdict = "beyond noise" if entry.beyond_noise else "within noise"
            lines.append(
                f"{entry.model} - {entry.minus}: {entry.difference:+.2f} "
                f"[{entry.ci_low:+.2f}, {entry.ci_high:+.2f}] {verdict}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class Cache:
    """What `deltakd.cache_teachers` returns (the cache's manifest, typed)."""

    path: Path
    examples: int
    response_tokens: int
    top_k: int
    tail_samples: int | None
    bytes_per_response_token: float | None
    skipped: bool  # the cache was already complete for these settings
    record: dict[str, Any] = field(repr=False)

    @classmethod
    def from_record(cls, manifest: dict[str, Any], path: str, skipped: bool) -> Cache:
        from deltakd_cli.cache.manifest import CacheRecord  # the one reading of a manifest

        record = CacheRecord.from_json(manifest)
        return cls(
            path=Path(path),
            examples=record.counts.get("examples", 0),
            response_tokens=record.counts.get("response_tokens", 0),
            top_k=record.top_k,
            tail_samples=record.options.get("tail_samples"),
            bytes_per_response_token=record.bytes_per_response_token,
            skipped=skipped,
            record=manifest,
        )


@dataclass(frozen=True)
class Run:
    """What `deltakd.distill` and `deltakd.finetune` return (OUT/run.json, typed)."""

    path: Path
    command: str
    objective: str
    seed: int
    steps: int | None
    final_loss: float | None
    skipped: bool  # OUT already held this very run
    record: dict[str, Any] = field(repr=False)

    @classmethod
    def from_record(cls, run: dict[str, Any], path: str, skipped: bool) -> Run:
        resolved = run.get("resolved") or {}
        metrics = run.get("final_metrics") or {}
        return cls(
            path=Path(path),
            command=run.get("command", ""),
            objective=resolved.get("objective", run["options"].get("objective", "sft")),
            seed=run["options"].get("seed", 0),
            steps=resolved.get("total_steps"),
            final_loss=metrics.get("final_loss"),
            skipped=skipped,
            record=run,
        )


@dataclass(frozen=True)
class PipelineRow:
    """One line of the pipeline's table: a role (e.g. student-delta) and its models."""

    role: str
    label: str
    paths: list[str]
    rouge_l: float
    std: float | None
    spread: str | None


@dataclass(frozen=True)
class Pipeline:
    """What `deltakd.pipeline` returns (OUT/summary.json, typed)."""

    path: Path
    rows: list[PipelineRow]
    comparisons: list[Difference]  # labels, as the table shows them
    report: Path
    record: dict[str, Any] = field(repr=False)

    @classmethod
    def from_record(cls, summary: dict[str, Any], path: str) -> Pipeline:
        results = summary["results"]
        rows = [
            PipelineRow(
                role=row["role"],
                label=row["label"],
                paths=list(row["models"]),
                rouge_l=row["rougeL"],
                std=row["rougeL_std"],
                spread=row.get("spread"),
            )
            for row in results["rows"]
        ]
        labels = {row.role: row.label for row in rows}
        return cls(
            path=Path(path),
            rows=rows,
            comparisons=[Difference.from_record(c, labels) for c in results["comparisons"]],
            report=Path(summary["report"]),
            record=summary,
        )


@dataclass(frozen=True)
class Report:
    """What `deltakd.report` returns: the page and the numbers' folder."""

    path: Path  # the folder
    page: Path  # its index.html


@dataclass(frozen=True)
class Pushed:
    """What `deltakd.push` returns."""

    repo: str
    url: str
    files: list[str]
