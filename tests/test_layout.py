"""The layout's rules (docs/architecture.md), read from the source: nothing imports the CLI, no
import cycle, no stage imports one that comes after it on the data path, and the stages that
share a level (training and evaluation) know nothing of each other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deltakd_cli"

# Each module's place on the data path: a module may import only from its own level or lower.
# A package has one place (its modules import each other freely): method/, the method's math,
# sits below every stage that uses it (cache, train, pipeline).
LEVELS = {
    "errors": 0, "faults": 0, "options": 1, "config": 1, "outputs": 1, "distributed": 1,
    "console": 2, "tracking": 2,
    "data": 2, "models": 2, "memory": 2, "sources": 2, "option_groups": 2, "vocab": 2,
    "method": 2,
    "cache": 4, "train": 5, "evaluate": 5, "init_student": 6, "report": 6, "pipeline": 7,
    "commands": 8, "cli": 9,
    "__init__": 0, "__main__": 10,
}  # fmt: skip
# Packages on one level that must not import each other.
SIBLINGS = {"train", "evaluate"}


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every deltakd_cli module a file imports, at any depth (functions included), except under
    `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("deltakd_cli"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deltakd_cli"):
            found.add(node.module)
            for alias in node.names:  # `from deltakd_cli.cache import store` imports a module
                candidate = f"{node.module}.{alias.name}"
                if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists():
                    found.add(candidate)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def graph() -> dict[str, set[str]]:
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        edges[module_name(path)] = {m for m in imports_of(path) if m != module_name(path)}
    return edges


def level(module: str) -> int:
    parts = module.split(".")
    return LEVELS[parts[1] if len(parts) > 1 else "__init__"]


def test_nothing_imports_the_cli():
    importers = [m for m, targets in graph().items() if "deltakd_cli.cli" in targets]
    assert importers == ["deltakd_cli.__main__"]


def test_imports_go_down_the_data_path():
    upward = [
        (module, target)
        for module, targets in graph().items()
        for target in targets
        if target != "deltakd_cli" and level(target) > level(module)
    ]
    assert upward == []


def test_the_method_reads_only_errors_and_options():
    """method/ is pure math over tensors: besides its own modules it may read the error types and
    `opt()` (its objectives' settings are options), nothing that does I/O or knows a stage."""
    allowed = {"deltakd_cli", "deltakd_cli.errors", "deltakd_cli.options"}
    outside = [
        (module, target)
        for module, targets in graph().items()
        if module.startswith("deltakd_cli.method")
        for target in targets
        if not target.startswith("deltakd_cli.method") and target not in allowed
    ]
    assert outside == []


def test_stages_on_one_level_do_not_import_each_other():
    """train/ and evaluate/ both sit above the cache: evaluation scores any model, trained here or
    not, and training never scores. Siblings importing each other would hide a second path."""
    sideways = [
        (module, target)
        for module, targets in graph().items()
        for target in targets
        if len(module.split(".")) > 1
        and len(target.split(".")) > 1
        and module.split(".")[1] != target.split(".")[1]
        and level(target) == level(module)
        and module.split(".")[1] in SIBLINGS
        and target.split(".")[1] in SIBLINGS
    ]
    assert sideways == []


def test_no_import_cycle():
    edges = graph()
    # packages import their own modules' names only through the full path: drop pkg -> pkg.mod
    state: dict[str, int] = {}
    cycle: list[str] = []

    def walk(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if target not in edges:
                continue
            if state.get(target) == 1:
                cycle.extend(trail[trail.index(target) :] + [target])
                return True
            if state.get(target) is None and walk(target, [*trail, target]):
                return True
        state[node] = 2
        return False

    for start in sorted(edges):
        if state.get(start) is None and walk(start, [start]):
            break
    assert cycle == []


def test_the_architecture_doc_lists_every_module():
    """docs/architecture.md's layout table names each module of the package once, and nothing
    that is not one."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## Layout") : doc.index("## Rules the layout keeps")]
    listed = re.findall(r"^\| `([\w/]+\.py)` \|", table, flags=re.MULTILINE)
    modules = sorted(path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py"))
    assert sorted(listed) == modules
