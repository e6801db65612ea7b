"""Every deltakd command: its name, its options dataclass and the function that runs it. The
CLI builds its commands from this list; the pipeline runs its stages through `run_command`
(handed to it by the CLI). Nothing here parses a command line."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from deltakd_cli.cache.options import CacheOptions, InspectOptions
from deltakd_cli.evaluate.options import EvalOptions
from deltakd_cli.init_student.options import InitStudentOptions
from deltakd_cli.pipeline.options import DemoOptions, PipelineOptions
from deltakd_cli.report.options import ReportOptions
from deltakd_cli.train.options import DistillOptions, FinetuneOptions, PushOptions


@dataclass(frozen=True)
class Command:
    name: str
    options: type  # the options dataclass (its docstring is the command's help)
    target: str  # "module:function" that runs it, imported when the command runs
    takes_runner: bool = False  # pipeline, demo, init-student run others through run_command


COMMANDS: tuple[Command, ...] = (
    Command("cache-teachers", CacheOptions, "deltakd_cli.cache.build:cache_teachers"),
    Command("inspect", InspectOptions, "deltakd_cli.cache.inspect:inspect_cache"),
    Command("distill", DistillOptions, "deltakd_cli.train.loop:distill"),
    Command("finetune", FinetuneOptions, "deltakd_cli.train.loop:finetune"),
    Command("eval", EvalOptions, "deltakd_cli.evaluate.run:run_eval"),
    Command(
        "init-student",
        InitStudentOptions,
        "deltakd_cli.init_student.run:init_student",
        takes_runner=True,
    ),  # fmt: skip
    Command("pipeline", PipelineOptions, "deltakd_cli.pipeline.run:pipeline", takes_runner=True),
    Command("demo", DemoOptions, "deltakd_cli.pipeline.demo:run_demo", takes_runner=True),
    Command("report", ReportOptions, "deltakd_cli.report.run:make_report"),
    Command("push", PushOptions, "deltakd_cli.train.hub:push"),
)
BY_NAME = {command.name: command for command in COMMANDS}


def run_command(name: str, options: Any) -> Any:
    """Run one command in this process with its options dataclass."""
    command = BY_NAME[name]
    module, function = command.target.split(":")
    run = getattr(importlib.import_module(module), function)
    return run(options, run_command) if command.takes_runner else run(options)
