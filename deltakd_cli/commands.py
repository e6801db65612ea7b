"""Every deltakd command: its name, its options dataclass and the function that runs it. The
CLI builds its commands from this list; the pipeline runs its stages through `run_command`
(handed to it by the CLI). Nothing here parses a command line."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


def _load(path: str) -> Any:
    """`module:name` -> the object (the module is imported on first use)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Command:
    """A command; its options dataclass is imported when first asked for, so the command line
    answers `--help` and `--version` without importing every command's options."""

    name: str
    options_at: str  # "module:Class" of the options dataclass (its docstring is the help)
    target: str  # "module:function" that runs it, imported when the command runs
    summary: str  # its line in `deltakd --help`: the options docstring's first sentence
    takes_runner: bool = False  # pipeline, demo, init-student run others through run_command

    @property
    def options(self) -> type:
        return _load(self.options_at)


COMMANDS: tuple[Command, ...] = (
    Command("cache-teachers", "deltakd_cli.cache.options:CacheOptions",
            "deltakd_cli.cache.build:cache_teachers",
            "Run both teachers (and S0) over the data once; store their sparse targets."),
    Command("inspect", "deltakd_cli.cache.options:InspectOptions",
            "deltakd_cli.cache.inspect:inspect_cache",
            "Summarise a cache, verify its checksums, or decode one example."),
    Command("distill", "deltakd_cli.train.options:DistillOptions",
            "deltakd_cli.train.loop:distill",
            "Train the student from the teachers' cache (Delta-KD, KD or SFT)."),
    Command("finetune", "deltakd_cli.train.options:FinetuneOptions",
            "deltakd_cli.train.loop:finetune",
            "Supervised finetuning from rows: the tuned teacher or the SFT baseline."),
    Command("eval", "deltakd_cli.evaluate.options:EvalOptions", "deltakd_cli.evaluate.run:run_eval",
            "Generate and score ROUGE-L, models side by side with paired intervals."),
    Command("init-student", "deltakd_cli.init_student.options:InitStudentOptions",
            "deltakd_cli.init_student.run:init_student",
            "Make a same-vocabulary student by layer pruning and healing.", takes_runner=True),
    Command("pipeline", "deltakd_cli.pipeline.options:PipelineOptions",
            "deltakd_cli.pipeline.run:pipeline",
            "Every stage in one go: teachers, cache, students, eval, report.",
            takes_runner=True),
    Command("demo", "deltakd_cli.pipeline.options:DemoOptions",
            "deltakd_cli.pipeline.demo:run_demo",
            "The whole method on the embedded default, offline (make demo).", takes_runner=True),
    Command("report", "deltakd_cli.report.options:ReportOptions",
            "deltakd_cli.report.run:make_report",
            "Plots and tables of runs, eval reports and pipelines as one HTML page."),
    Command("push", "deltakd_cli.train.options:PushOptions", "deltakd_cli.train.hub:push",
            "Upload a model directory and its card to the Hugging Face Hub."),
)  # fmt: skip
BY_NAME = {command.name: command for command in COMMANDS}


class _OptionsByCommand(Mapping[str, type]):
    """command name -> options dataclass, each imported when looked up."""

    def __getitem__(self, name: str) -> type:
        return BY_NAME[name].options

    def __iter__(self) -> Iterator[str]:
        return iter(BY_NAME)

    def __len__(self) -> int:
        return len(BY_NAME)


OPTIONS_BY_COMMAND: Mapping[str, type] = _OptionsByCommand()


def run_command(name: str, options: Any) -> Any:
    """Run one command in this process with its options dataclass."""
    command = BY_NAME[name]
    run = _load(command.target)
    return run(options, run_command) if command.takes_runner else run(options)
