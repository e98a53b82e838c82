"""The package layout: fedgin-internal imports form no cycle (function-level imports included),
no source file is over 500 lines, and every package says in a docstring what lives in it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fedgin"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = sorted(name for name, p in MODULES.items() if p.name == "__init__.py")


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(name: str, path: Path) -> set[str]:
    """The fedgin modules ``name`` imports anywhere in its source (module level, in functions, under
    TYPE_CHECKING), plus the packages whose ``__init__`` each such import runs first."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            targets |= {f"{module}.{alias.name}" for alias in node.names}  # from package import submodule
    edges = set()
    for target in targets:
        if target not in MODULES:
            continue
        # importing a.b.c runs a's and a.b's __init__ first (those that are not already being imported)
        edges |= {t for t in [*_ancestors(target), target] if t != name and t not in _ancestors(name)}
    return edges


GRAPH = {name: _imported(name, path) for name, path in MODULES.items()}


def test_the_import_graph_is_read() -> None:
    assert "fedgin.config" in GRAPH["fedgin.engine.trainer"]
    assert "fedgin.engine" in GRAPH["fedgin.evaluation.scoring"]  # a parent package's __init__ counts
    assert "fedgin.experiments.redraw" in GRAPH["fedgin.cli"]  # a function-level import counts


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_source_file_is_over_500_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines; split it by concern"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_says_what_lives_in_it(package: str) -> None:
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text()))
    assert doc and doc.strip(), f"{package}/__init__.py needs a docstring"


@pytest.mark.parametrize("package", PACKAGES)
def test_exported_names_resolve_and_hide_no_module(package: str) -> None:
    """Every name in ``__all__`` exists, and none is a function or class named like one of the
    package's modules (it would hide the module: monkeypatching ``package.module`` would miss)."""
    module = importlib.import_module(package)
    for name in getattr(module, "__all__", ()):
        assert hasattr(module, name), f"{package}.__all__ names {name!r}, which it does not have"
        assert f"{package}.{name}" not in MODULES, f"{package}.{name} is both a module and an exported name"
