"""The tree's rules, checked on the source: the core library knows no face (CLI, web), and no module
imports another that imports it back (directly or through others)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("diffgap", "indexer", "service")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Project modules `path` imports anywhere in its code (lazy imports inside functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_core_library_imports_no_face():
    offenders = {m: sorted(d for d in deps if d.split(".")[0] in ("indexer", "service"))
                 for m, deps in graph().items() if m.startswith("diffgap")}  # fmt: skip
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_import_cycles():
    edges = graph()
    # a package's __init__ is not an edge back to its own modules' importers
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in edges.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_faces_do_not_import_each_other():
    edges = graph()
    assert not any(d.startswith("service") for m, deps in edges.items() if m.startswith("indexer") for d in deps)
    assert not any(d.startswith("indexer") for m, deps in edges.items() if m.startswith("service") for d in deps)
