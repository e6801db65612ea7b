"""Experiment trackers for `--report-to`: TensorBoard, Weights & Biases and MLflow, each through
its own library (the optional extra `deltakd[tracking]`), behind one small protocol.

Where each writes, for a run whose output directory is OUT:

- tensorboard: event files in OUT/runs/ (`tensorboard --logdir OUT/runs`);
- wandb: its run directory under OUT/wandb/ (`WANDB_MODE=offline` keeps it local; `wandb sync`
  uploads it later); project from WANDB_PROJECT (default `deltakd`);
- mlflow: the tracking URI in MLFLOW_TRACKING_URI, else a local file store in OUT/mlruns/
  (`mlflow ui --backend-store-uri OUT/mlruns`); experiment from MLFLOW_EXPERIMENT_NAME (default
  `deltakd`).

Only rank 0 logs: on other ranks `open_trackers` returns a tracker that does nothing."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from deltakd_cli import distributed
from deltakd_cli.errors import DeltakdError

# name -> the module its library provides (what `pip install 'deltakd[tracking]'` brings)
LIBRARIES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
NAMES = (*LIBRARIES, "none")
EXTRA = "pip install 'deltakd[tracking]'"
MAX_VALUE_CHARS = 500  # MLflow keeps at most 500 characters of a parameter in older stores
DEFAULT_PROJECT = "deltakd"

# What a training record's keys become in a tracker (a record is a metrics.jsonl line).
TRAIN_KEYS = {
    "loss": "train/loss",
    "sft": "train/sft",
    "distill": "train/distill",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "target_tokens_seen": "train/target_tokens_seen",
}


class Tracker(Protocol):
    """One experiment tracker's run."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def parse_report_to(names: str | None) -> list[str]:
    """The trackers of a `--report-to` value (comma-separated; `none` or empty: no tracker),
    checked: an unknown name or a missing library is one line."""
    chosen: list[str] = []
    for name in (names or "none").split(","):
        name = name.strip().lower()
        if not name or name == "none":
            continue
        if name not in LIBRARIES:
            raise DeltakdError(f"unknown --report-to '{name}' (choose from {', '.join(NAMES)})")
        if name not in chosen:
            chosen.append(name)
    for name in chosen:
        if not _installed(LIBRARIES[name]):
            raise DeltakdError(_missing(name))
    return chosen


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _missing(name: str) -> str:
    return f"--report-to {name} needs the {LIBRARIES[name]} package: {EXTRA}"


def _import(name: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise DeltakdError(f"{_missing(name)} ({error})") from None


# ----------------------------------------------------------------------------- params, records


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float]:
    """Options as flat parameters: nested dicts become dotted keys, lists and other values
    strings, long values cut to MAX_VALUE_CHARS (numbers and booleans stay numbers)."""
    flat: dict[str, str | int | float] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name + "."))
            continue
        if isinstance(value, bool) or value is None:
            value = str(value)
        elif isinstance(value, (list, tuple, Mapping)):
            value = json.dumps(value, default=str)
        elif not isinstance(value, (int, float)):
            value = str(value)
        if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
            value = value[: MAX_VALUE_CHARS - 1] + "…"
        flat[name] = value
    return flat


def record_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker metrics: the training keys as `train/...`, every
    `eval_<name>` as `eval/<name>`; other keys (step, epoch, ...) and non-numbers are left out."""
    metrics: dict[str, float] = {}
    for key, value in record.items():
        if key in TRAIN_KEYS:
            name = TRAIN_KEYS[key]
        elif key.startswith("eval_"):
            name = "eval/" + key[len("eval_") :]
        else:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[name] = float(value)
    return metrics


def log_record(trackers: Tracker, record: Mapping[str, Any]) -> None:
    """Log one metrics.jsonl record (a training step's, or a held-out evaluation's) at its
    step."""
    metrics = record_metrics(record)
    if metrics:
        trackers.log_metrics(metrics, int(record["step"]))


# ----------------------------------------------------------------------------- backends


class TensorBoardTracker:
    """Event files in OUT/runs/ (torch's SummaryWriter)."""

    def __init__(self, out: Path, run_name: str):
        _import("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = out / "runs"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.where = {"log_dir": str(self.log_dir)}

    def log_params(self, params: dict[str, Any]) -> None:
        rows = ["| parameter | value |", "|---|---|"]
        rows += [f"| {key} | {str(value).replace('|', '/')} |" for key, value in params.items()]
        self.writer.add_text("params", "\n".join(rows), global_step=0)
        self.writer.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in OUT/wandb/ (WANDB_MODE=offline keeps it on disk)."""

    def __init__(self, out: Path, run_name: str, job_type: str | None):
        wandb = _import("wandb", "wandb")
        out.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                name=run_name,
                job_type=job_type,
                dir=str(out),
                settings=wandb.Settings(console="off"),
            )
        except Exception as error:  # wandb's own errors: no API key, no network, ...
            raise DeltakdError(
                f"--report-to wandb: could not start a W&B run ({_first_line(error)}); run "
                "`wandb login`, or set WANDB_MODE=offline to keep the run on disk"
            ) from None
        self.where = {
            "dir": str(out / "wandb"),
            "run_dir": str(Path(self.run.dir).parent),
            "mode": getattr(self.run.settings, "mode", None) or os.environ.get("WANDB_MODE"),
            "project": self.run.project,
            "run_id": self.run.id,
        }

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    """An MLflow run: MLFLOW_TRACKING_URI, else a local file store in OUT/mlruns/. Uses the
    client API (no global active run), so a pipeline's stages open and close their own."""

    def __init__(self, out: Path, run_name: str):
        _import("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (out / "mlruns").resolve().as_uri()
            # MLflow 3 keeps the file store in maintenance mode behind this switch; a local
            # store in OUT is what --report-to mlflow promises without a tracking server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id if found else self.client.create_experiment(experiment)
            )
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        except Exception as error:  # MLflow's own errors: an unreachable server, a bad URI
            raise DeltakdError(
                f"--report-to mlflow: could not start a run at {uri} ({_first_line(error)})"
            ) from None
        self.where = {"tracking_uri": uri, "experiment": experiment, "run_id": self.run_id}

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _millis()
        items = [Metric(key, value, now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _millis() -> int:
    import time

    return int(time.time() * 1000)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ----------------------------------------------------------------------------- fan-out


class Trackers:
    """Every chosen tracker as one (none: a tracker that does nothing)."""

    def __init__(self, trackers: Iterable[Tracker] = (), names: Iterable[str] = ()):
        self.trackers = list(trackers)
        self.names = list(names)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_params(self, params: dict[str, Any]) -> None:
        flat = flatten_params(params)
        for tracker in self.trackers:
            tracker.log_params(flat)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        finite = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if not finite:
            return
        for tracker in self.trackers:
            tracker.log_metrics(finite, step)

    def close(self, failed: bool = False) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed)

    def describe(self) -> dict[str, Any]:
        """Which trackers ran and where their files or runs are (for run.json)."""
        return {
            name: getattr(tracker, "where", {})
            for name, tracker in zip(self.names, self.trackers, strict=True)
        }


def open_trackers(
    names: str | None,
    out: Path,
    run_name: str,
    params: dict[str, Any],
    job_type: str | None = None,
) -> Trackers:
    """Start a run in each tracker of `names` (a `--report-to` value) and log `params`; no-op for
    `none` and on ranks other than 0. An unknown name or a missing library is one line."""
    chosen = parse_report_to(names)
    if not chosen or not distributed.is_main_process():
        return Trackers()
    out = Path(out)
    opened: list[Tracker] = []
    try:
        for name in chosen:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(out, run_name))
            elif name == "wandb":
                opened.append(WandbTracker(out, run_name, job_type))
            else:
                opened.append(MlflowTracker(out, run_name))
    except BaseException:
        for tracker in opened:
            tracker.close(failed=True)
        raise
    trackers = Trackers(opened, chosen)
    trackers.log_params(params)
    return trackers
