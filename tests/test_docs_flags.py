"""Docs that agree with the code: every `--flag` quoted in README.md, docs/ and examples/ is a
flag of the command it is quoted with (or of some deltakd command, when none is named), and
every default a doc states where a machine can read it (an options table's default column, a
"(default X)" after a flag, a command span marked "(the defaults)") is the CLI's default. The
reference is the click command typer builds, the same object `deltakd --help` prints."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import typer
from helpers import REPO

from deltakd_cli.cli import app

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(
    (REPO / "examples").glob("*.yaml"))]  # fmt: skip
# The bench scripts' own flags (python bench/X.py --flag), read from their source.
BENCH = "\n".join(p.read_text() for p in sorted((REPO / "bench").glob("*.py")))
# Other programs quoted with their own flags: a piece naming one is checked for deltakd's only
# where it also names deltakd.
OTHER_PROGRAMS = re.compile(r"\b(tensorboard|mlflow|torchrun|pip|pytest|python bench/)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]")
COMMAND = re.compile(r"\bdeltakd(?:_cli)?\s+([a-z][a-z-]*)")
# Flags of other tools quoted beside deltakd's (pip, torchrun, pytest, make's own variables).
OTHER_TOOLS = {
    "--no-deps", "--nproc_per_node", "--nnodes", "--node_rank", "--master_addr",
    "--master_port", "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id", "--upgrade",
    "--index-url", "--extra-index-url", "--install-completion", "--show-completion",
    "--version", "--help",
}  # fmt: skip


def cli() -> dict[str, dict[str, object]]:
    """command -> {flag: default} for every deltakd command (hidden old spellings included)."""
    root = typer.main.get_command(app)
    context = click.Context(root)
    flags: dict[str, dict[str, object]] = {}
    for name in root.list_commands(context):
        command = root.get_command(context, name)
        commands = getattr(command, "commands", None) or {name: command}
        for sub in commands.values():
            table = flags.setdefault(name, {})
            for param in sub.params:
                for flag in [*param.opts, *param.secondary_opts]:
                    if flag.startswith("--"):
                        table[flag] = param.default
    return flags


FLAGS = cli()
EVERY = {flag for table in FLAGS.values() for flag in table} | OTHER_TOOLS


def quoted(text: str) -> list[str]:
    """Code: fenced blocks (each logical line, backslash continuations joined) and inline
    spans."""
    pieces = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        pieces += block.replace("\\\n", " ").splitlines()
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    pieces += re.findall(r"`([^`\n]+)`", outside)
    # indented code blocks (four spaces) in markdown
    pieces += [line for line in outside.splitlines() if line.startswith("    deltakd")]
    return pieces


def doc_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".yaml":  # the comments' text, as code
        return "\n".join(f"`{c}`" for c in re.findall(r"#(.*)", text))
    return text


def stale_flags(path: Path) -> list[str]:
    problems = []
    for piece in quoted(doc_text(path)):
        named = COMMAND.findall(piece)
        first = piece.split()[0] if piece.split() else ""
        if not named and first in FLAGS:  # `distill --tail bucket`: the command without deltakd
            named = [first]
        for flag in FLAG.findall(piece):
            if flag.startswith("--no-") and f"--{flag[5:]}" in EVERY:
                continue  # the off spelling of an on/off flag
            known = {f for name in named if name in FLAGS for f in FLAGS[name]} or EVERY
            if not named and (OTHER_PROGRAMS.search(piece) or f'"{flag}"' in BENCH):
                continue
            if flag not in known and flag not in OTHER_TOOLS:
                where = f"deltakd {'/'.join(named)}" if named else "any deltakd command"
                problems.append(f"{path.name}: {flag} is not a flag of {where}: "
                                f"{piece.strip()[:100]}")  # fmt: skip
    return problems


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_quoted_flag_exists(path):
    assert stale_flags(path) == []


def same(stated: str, default: object) -> bool | None:
    """Whether a stated default is the CLI's; None when the statement is not machine-checkable."""
    stated = stated.strip().strip("`").strip()
    if stated in ("off", "none", "unset"):
        return default in (False, None, 0, "", ())
    if stated == "on":
        return default is True
    if isinstance(default, (int, float)):
        try:
            return float(stated) == float(default)
        except ValueError:
            return None
    if isinstance(default, str) and re.fullmatch(r"[a-z][a-z0-9-]*", stated):
        return stated == default
    return None


def stated_defaults(path: Path) -> list[tuple[str, str, str]]:
    """(flag, stated default, where) from options tables (a `default` column), "(default X)"
    right after a flag, and `deltakd CMD --flag V ...` spans followed by "(the defaults)"."""
    text = doc_text(path)
    found = []
    header = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = [cell.lower() for cell in cells]
            continue
        if "default" in header and cells and re.fullmatch(r"`--[a-z0-9-]+`", cells[0]):
            found.append((cells[0].strip("`"), cells[header.index("default")], line))
    for flag, value in re.findall(r"`(--[a-z0-9-]+)`\s*\(default (`?[\w.-]+`?)[,)]", text):
        found.append((flag, value, f"{flag} (default {value})"))
    for span in re.findall(r"`([^`\n]+)`\s*\(the defaults?\)", text):
        for flag, value in re.findall(r"(--[a-z0-9-]+)\s+(\w[\w.-]*)", span):
            found.append((flag, value, span))
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_stated_default_is_the_cli_default(path):
    problems = []
    for flag, value, where in stated_defaults(path):
        defaults = [table[flag] for table in FLAGS.values() if flag in table]
        verdicts = [same(value, default) for default in defaults]
        if not defaults:
            problems.append(f"{flag}: no such flag ({where[:90]})")
        elif None not in verdicts and not any(verdicts):
            problems.append(f"{flag}: the doc says {value}, the CLI's default is {defaults[0]!r} "
                            f"({where[:90]})")  # fmt: skip
    assert problems == []


def split_tables(path: Path) -> list[str]:
    """Table rows that start a block without a header and separator above them."""
    problems = []
    lines = path.read_text(encoding="utf-8").splitlines()
    inside = False
    for number, line in enumerate(lines):
        table_line = line.startswith("|") and line.rstrip().endswith("|")
        if table_line and not inside:
            separator = lines[number + 1] if number + 1 < len(lines) else ""
            if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", separator.strip()):
                problems.append(f"{path.name}:{number + 1}: {line[:60]}")
        inside = table_line
    return problems


def test_markdown_tables_are_whole():
    """A table's rows are one block under its header and separator: a paragraph in the middle
    made docs/training.md's last rows render as stray text."""
    assert [p for path in DOCS if path.suffix == ".md" for p in split_tables(path)] == []


def test_the_checks_catch_a_stale_quote(tmp_path):
    """The checks can fail: a renamed flag, a wrong default and a split table are each caught."""
    doc = tmp_path / "stale.md"
    doc.write_text(
        "Run `deltakd distill --cache C --no-such-flag 3`.\n\n"
        "| option | default | meaning |\n|---|---|---|\n| `--lr` | 1.0 | peak lr |\n\n"
        "| `--epochs` | 1 | stray |\n"
    )
    assert any("--no-such-flag" in p for p in stale_flags(doc))
    assert split_tables(doc) == ["stale.md:7: | `--epochs` | 1 | stray |"]
    doc.write_text("`distill --top-k 3` is a cache-teachers flag quoted with distill.\n")
    assert stale_flags(doc) == [
        "stale.md: --top-k is not a flag of deltakd distill: distill --top-k 3"
    ]
    doc.write_text("| option | default | meaning |\n|---|---|---|\n| `--lr` | 1.0 | peak lr |\n")
    stated = stated_defaults(doc)
    assert ("--lr", "1.0") in [(f, v) for f, v, _ in stated]
    assert same("1.0", FLAGS["distill"]["--lr"]) is False


def _table_after(text: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after `heading`."""
    rest = text.split(heading, 1)[1]
    lines = [line for line in rest.splitlines() if line.startswith("|")]
    start = rest.splitlines().index(lines[0])
    rows = []
    for line in rest.splitlines()[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[2:]


def test_docs_demo_shows_what_the_demo_runs():
    """Issue 27: docs/demo.md showed `--top-k 64` after the demo moved to the sampled tail, its
    better-S0 table's default column disagreed with its main table (KD 28.05 against 28.26),
    and examples/demo.yaml said "first 10 of 30 layers" where the demo keeps layers by block
    influence."""
    from deltakd_cli.init_student.layers import resolve_rule
    from deltakd_cli.pipeline.demo import DEFAULT_PROFILE

    text = (REPO / "docs" / "demo.md").read_text()
    cache_row = next(r for r in _table_after(text, "## What it runs") if r[0] == "cache")
    for flag in ("top_k", "tail_samples"):
        assert f"--{flag.replace('_', '-')} {DEFAULT_PROFILE.get(flag)}" in cache_row[1]
    heading = "### The default (`make demo`) before the sampled tail"
    main = {r[0].split(" (")[0]: r[1].strip("*") for r in _table_after(text, heading)}
    better = _table_after(text, "### The same with a better S0")
    for row in better:
        if row[0] in main:
            assert row[1] == main[row[0]], row
    assert any(row[0] == "KD student" for row in better)
    yaml = (REPO / "examples" / "demo.yaml").read_text()
    comment = yaml.split("init_student:", 1)[1].split("source:", 1)[0]
    assert resolve_rule("auto", have_text=True) == "block-influence"  # heal_data is set there
    assert "block influence" in comment and "first 10" not in comment
