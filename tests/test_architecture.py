"""The package's shape, read from its source: no import cycles, and every import along the folders' order.

A module's layer is its folder: the modules at the top of ``cifar/`` are the foundations (errors,
config, settings, metrics, plots, locks), then the folders in this order. Imports inside
functions and under ``TYPE_CHECKING`` count: a lazy import is still a dependency.

Imports sit at the top of their module; one inside a function says why on its line or the line
above (``# lazy: <reason>``): the slim app venv lacks the package, it is optional, or it is heavy
on a path that must start fast (the app, a command's --help).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

# Bottom first. tracking publishes what the layers above it made and imports only the foundations;
# serve reads a registered model, and assess and promote score candidates through that same reader.
LAYERS = ("foundations", "contract", "tracking", "data", "engine", "run", "search", "serve", "assess", "promote", "ops")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT / "cifar").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "cifar"


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from cifar.tracking import X`` counts as ``tracking``)."""
    files = {module_name(p): p for p in (ROOT / "cifar").rglob("*.py")}

    def owner(target: str) -> str | None:
        name = target.removeprefix("cifar").removeprefix(".")
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        if name == "cifar":
            continue
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for target in targets:
                if target == "cifar" or target.startswith("cifar."):
                    dependency = owner(target)
                    if dependency and dependency != name:
                        edges.add(dependency)
    return graph


def layer_of(module: str) -> int:
    folder = module.split(".")[0] if "." in module or (ROOT / "cifar" / module).is_dir() else "foundations"
    assert folder in LAYERS, f"cifar/{folder}/ is in no layer: add it to LAYERS in {Path(__file__).name}"
    return LAYERS.index(folder)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each as the path that closes it (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30  # the whole package was read
    assert cycles(graph) == []


def test_every_import_runs_along_the_data_flow():
    graph = import_graph()
    against = [
        f"cifar.{a} ({LAYERS[layer_of(a)]}) imports cifar.{b} ({LAYERS[layer_of(b)]})"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert against == []


def test_tracking_imports_only_the_foundations():
    graph = import_graph()
    imported = {b for a, targets in graph.items() if a.startswith("tracking") for b in targets}
    assert {layer_of(b) for b in imported} <= {0, LAYERS.index("tracking")}, imported


def test_the_checks_catch_a_cycle_and_a_backward_import():
    """The checks themselves fail when they should."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer_of("errors") < layer_of("data.loader") < layer_of("engine") < layer_of("serve.serving")
    assert layer_of("serve.serving") < layer_of("promote.registry") < layer_of("ops.heroku")


MAX_FUNCTION_IMPORTS = 60  # issue 48: imports at the top; the lazy ones are few, and each says why


def function_imports(source: str) -> list[tuple[int, bool]]:
    """(line, whether it says ``lazy:``) of each import statement inside a function of ``source``."""
    lines = source.splitlines()

    def says_lazy(number: int) -> bool:  # a comment on the import's first line or the line above
        return any("lazy:" in line.partition("#")[2] for line in lines[max(0, number - 2) : number])

    found = {
        node.lineno
        for function in ast.walk(ast.parse(source))
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    }
    return [(number, says_lazy(number)) for number in sorted(found)]


def test_function_level_imports_are_few_and_say_why():
    found = {
        f"{path.relative_to(ROOT)}:{number}": lazy
        for path in sorted((ROOT / "cifar").rglob("*.py"))
        for number, lazy in function_imports(path.read_text())
    }
    assert len(found) <= MAX_FUNCTION_IMPORTS, f"{len(found)} imports inside functions: hoist some to the top"
    unexplained = [where for where, lazy in found.items() if not lazy]
    assert unexplained == [], "imports inside functions without a '# lazy: <reason>' comment (or hoist them)"


def test_the_lazy_import_check_reads_comments():
    source = """import os


def f():
    import json  # lazy: a reason
    # lazy: the reason for the next line
    from pathlib import Path
    import sys
    text = "lazy: in a string, not a comment"; import re

    def g():
        import csv  # no reason given
"""
    assert function_imports(source) == [(5, True), (7, True), (8, False), (9, False), (12, False)]
