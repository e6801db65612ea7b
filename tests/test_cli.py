"""cli.py: the command line answers at once. Building the app and showing any command's help
imports nothing heavy (torch, transformers, zarr, datasets, numpy): those load when a command
runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO

HEAVY = ("torch", "transformers", "zarr", "datasets", "numpy")

PROBE = """
import json, sys
from typer.testing import CliRunner
from deltakd_cli.cli import app
runner = CliRunner()
for args in json.loads(sys.argv[1]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


@pytest.mark.slow
def test_help_version_and_config_show_import_nothing_heavy():
    """In a fresh interpreter (this one has torch already): the app, `--help` of the app and of
    every command, `--version` and `config show` leave torch and the rest unimported."""
    from deltakd_cli.commands import COMMANDS

    calls = [["--help"], ["--version"], ["config", "show", "distill"]]
    calls += [[command.name, "--help"] for command in COMMANDS]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(calls)],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert "deltakd_cli" in loaded and "typer" in loaded  # the probe did import the CLI
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
