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

    def place(word: str) -> str:  # a Hub id alone or labelled (NAME=MODEL)
        name, equals, spec = word.rpartition("=")
        return f"{name}{equals}{places.get(spec, spec)}"

    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            words = shlex.split(line)
            assert words[0] == "deltakd", line
            commands.append([place(word) for word in words[1:]])
    assert [c[0] for c in commands] == ["cache-teachers", "inspect", "distill", "distill",
                                        "distill", "eval", "report"]  # fmt: skip
    # Issue 27: the eval has the teachers and S0 beside the students, to compare against.
    evaluated = [c[i + 1].rpartition("=")[2] for c in commands if c[0] == "eval"
                 for i, word in enumerate(c) if word == "--model"]  # fmt: skip
    for model in (tiny.teacher_base, tiny.teacher_tuned, tiny.student):
        assert str(model) in evaluated
    monkeypatch.chdir(tmp_path)
    for command in commands:
        result = run_cli(command)
        assert result.exit_code == 0, (command, result.output)
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report" / "index.html").is_file()
    page = (tmp_path / "report" / "index.html").read_text()
    for label in ("teacher-base", "teacher-tuned", "S0", "Teachers' cache", "Example gen"):
        assert label in page
