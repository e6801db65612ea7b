"""pyproject.toml says what really installs: requires-python is at least what every core
dependency (as installed here) requires, and no extra names a package the core already pulls
in (read from the installed packages' own metadata)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

from helpers import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def name_of(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def python_floor(specifier: str | None) -> tuple[int, ...]:
    found = re.search(r">=\s*(\d+(?:\.\d+)*)", specifier or "")
    parts = [int(part) for part in found.group(1).split(".")] if found else [0]
    return tuple((parts + [0, 0])[:3])


def closure(names: list[str]) -> set[str]:
    """Every package the installed `names` pull in (their own requirements without extras or
    environment markers that exclude this machine), recursively."""
    seen: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in requirements:
            if "extra ==" in requirement or 'sys_platform == "win32"' in requirement:
                continue
            pending.append(name_of(requirement))
    return seen


def test_requires_python_covers_every_core_dependency():
    ours = python_floor(PROJECT["requires-python"])
    for requirement in PROJECT["dependencies"]:
        theirs = python_floor(metadata.metadata(name_of(requirement)).get("Requires-Python"))
        assert ours >= theirs, (requirement, theirs)
    assert ours >= (3, 11, 0)  # zarr 3 needs it (the reason the floor moved)


def test_no_extra_repeats_what_the_core_pulls_in():
    core = [name_of(r) for r in PROJECT["dependencies"]]
    pulled = closure(core)
    for extra, requirements in PROJECT["optional-dependencies"].items():
        if extra == "dev":  # the test tools name what they use, wherever it comes from
            continue
        for requirement in requirements:
            assert name_of(requirement) not in pulled, (extra, requirement)
