"""How fast the CLI answers: `deltakd --help`, `--version` and `config show distill` against
`python -c "import typer, rich"` (the floor of any typer CLI), each the median of fresh
processes, as ratios. Goal: <= 2x (docs/benchmarks.md)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from common import REPO, record

RUNS = 7
CALLS = {
    "help": ["-m", "deltakd_cli", "--help"],
    "version": ["-m", "deltakd_cli", "--version"],
    "config_show": ["-m", "deltakd_cli", "config", "show", "distill"],
}
FLOOR = ["-c", "import typer, rich"]


def median_seconds(arguments: list[str]) -> float:
    """The median wall time of RUNS fresh interpreters (one untimed run first warms the disk
    cache and the bytecode)."""
    command = [sys.executable, *arguments]
    subprocess.run(command, cwd=REPO, capture_output=True, check=True)
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO, capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    floor = median_seconds(FLOOR)
    figures = {"startup_typer_rich_seconds": round(floor, 3)}
    for name, arguments in CALLS.items():
        seconds = median_seconds(arguments)
        figures[f"startup_{name}_seconds"] = round(seconds, 3)
        figures[f"startup_{name}_vs_typer_rich"] = round(seconds / floor, 2)
    settings = {"runs": RUNS, "statistic": "median wall seconds of fresh processes"}
    record("startup", figures, settings)
    for name, value in figures.items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
