"""The house rules of the source tree, checked on every run: small files, small functions, no
import cycle, and the one-way imports of the design (``adapters`` knows nothing of ``service``
or ``training``; those two do not know each other)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())[
    "tool"]["setuptools"]["package-dir"]
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
# aat_serve.X may import aat_serve.Y only where Y is listed for X (the root package, the CLI and
# the benchmarks sit above the three libraries).
MAY_IMPORT = {
    "adapters": {"adapters"},
    "training": {"adapters", "training"},
    "service": {"adapters", "service"},
}


def modules() -> dict[str, Path]:
    """Every module of the installed package, by its import name."""
    found: dict[str, Path] = {}
    for name, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("").parts
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            if name == "aat_serve" and parts and f"aat_serve.{parts[0]}" in PACKAGE_DIRS:
                continue  # a mapped folder of its own, not a file of the root package
            found[".".join((name, *parts))] = path
    return found


MODULES = modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imported_modules(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports, anywhere in it but ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            submodules = {f"{base}.{a.name}" for a in node.names} & MODULES.keys()
            out.update(submodules)
            if len(submodules) < len(node.names):  # names defined in ``base`` itself
                out.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def is_generated(path: Path) -> bool:
    return "demo_assets" in path.parts


def test_no_file_is_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if not is_generated(p) and (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert long == {}


def test_no_function_is_over_the_line_limit():
    long = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = n
    assert long == {}


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    """The 'differs' check: a made-up cycle is found, and an import chain is not one."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_libraries_import_one_way():
    wrong = []
    for name, deps in GRAPH.items():
        layer = name.split(".")[1] if name.count(".") else ""
        if layer not in MAY_IMPORT:
            continue
        for dep in deps:
            dep_layer = dep.split(".")[1] if dep.count(".") else "aat_serve"
            if dep_layer not in MAY_IMPORT[layer]:
                wrong.append(f"{name} -> {dep}")
    assert wrong == []


def test_the_import_graph_sees_real_imports():
    """The graph is not empty by accident: known edges are there."""
    assert "aat_serve.adapters.bundle" in GRAPH["aat_serve.service.registry"]
    assert "aat_serve.adapters.errors" in GRAPH["aat_serve.cli.main"]
