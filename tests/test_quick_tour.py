"""The README's quick tour runs as written, with the tiny local models in place of the Hub ids."""

from __future__ import annotations

import re

import pytest
from helpers import REPO


@pytest.mark.slow
def test_the_readme_quick_tour_runs_as_written(tiny, tmp_path, monkeypatch):
    """The README's first shell block, command by command, with the tiny local models and rows
    in place of the Hub ids and files it names (the only substitution)."""
    import shlex

    from helpers import run_cli

    readme = (REPO / "README.md").read_text()
    tour = readme.split("## Quick tour", 1)[1]
    block = re.search(r"```bash\n(.*?)```", tour, flags=re.S).group(1)
    places = {
        "Qwen/Qwen2.5-7B": str(tiny.teacher_base),
        "my-org/qwen2.5-7b-sft": str(tiny.teacher_tuned),
        "Qwen/Qwen2.5-0.5B": str(tiny.student),
        "dolly-test.jsonl": str(tiny.test),
        "train.jsonl": str(tiny.train),
    }
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            words = shlex.split(line)
            assert words[0] == "deltakd", line
            commands.append([places.get(word, word) for word in words[1:]])
    assert [c[0] for c in commands] == ["cache-teachers", "inspect", "distill", "distill",
                                        "distill", "eval", "report"]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    for command in commands:
        result = run_cli(command)
        assert result.exit_code == 0, (command, result.output)
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report" / "index.html").is_file()
