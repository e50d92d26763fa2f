"""The package's shape, read from its source: no import cycles, and every import along the data flow.

    source -> cache -> loader -> engine -> run (results) -> tracking -> registry -> serving/app

Each module sits in one layer and imports only from its own layer or earlier ones. Tracking is
a leaf: it publishes what the run made and imports nothing of the project but the foundations,
so it sits before everything it publishes. Imports inside functions count too: a lazy import is
still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

LAYERS: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (name, frozenset(modules))
    for name, modules in (
        (
            "foundations",
            {
                "errors",
                "config",
                "settings",
                "cli",
                "metrics",
                "plots",
                "ops.locks",
                "serve.preprocess",
                "run",
                "assess",
                "promote",
                "serve",
                "ops",
            },  # the role packages' __init__: docstrings only
        ),  # fmt: skip
        ("tracking", {"tracking"}),  # a leaf: publishes what others made
        (
            "contract",
            {"serve.contract", "assess.trust", "serve.registered", "serve.modelcache", "serve.inference"},
        ),  # the served graph, read
        ("source", {"data.sources"}),
        ("cache", {"data.cache", "data", "data.__main__"}),
        ("loader", {"data.loader"}),
        ("engine", {"models", "engine", "run.distributed", "run.checkpoint", "assess.corruptions"}),
        ("run", {"run.export", "assess.calibration", "run.report", "run.results", "run.training"}),
        ("search", {"search", "search.space"}),
        (
            "registry",
            {
                "promote.candidates",
                "promote.registry",
                "promote.promotion",
                "assess.calibrate",
                "assess.evaluate",
                "assess.robustness",
                "assess.quantize",
                "assess.compare",
                "data.eda",
                "promote.bundle",
                "promote.sync",
            },
        ),
        ("operations", {"ops.localstack", "ops.heroku"}),
        ("serving", {"serve.serving", "serve.predict", "__main__"}),  # __main__: python -m cifar <command>
    )
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT / "cifar").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "cifar"


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``cifar.tracking.runs`` counts as ``tracking``)."""
    files = {module_name(p): p for p in (ROOT / "cifar").rglob("*.py")}

    def owner(target: str) -> str | None:
        name = target.removeprefix("cifar").removeprefix(".")
        while name and name not in files:
            name = name.rpartition(".")[0]
        return unit(name) if name else None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        if name == "cifar":
            continue
        edges = graph.setdefault(unit(name), set())
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for target in targets:
                if target == "cifar" or target.startswith("cifar."):
                    dependency = owner(target)
                    if dependency and dependency != unit(name):
                        edges.add(dependency)
    return graph


def unit(name: str) -> str:
    """The tracking and engine packages are one unit each; data and search are read module by module."""
    for package in ("tracking", "engine"):
        if name == package or name.startswith(package + "."):
            return package
    return name


def layer_of(module: str) -> int:
    for number, (_, modules) in enumerate(LAYERS):
        if module in modules:
            return number
    raise AssertionError(f"cifar.{module} is in no layer: add it to LAYERS in {Path(__file__).name}")


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
        f"cifar.{a} ({LAYERS[layer_of(a)][0]}) imports cifar.{b} ({LAYERS[layer_of(b)][0]})"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert against == []


def test_tracking_imports_only_the_foundations():
    foundations = LAYERS[0][1]
    assert import_graph()["tracking"] <= foundations, import_graph()["tracking"] - foundations


def test_the_checks_catch_a_cycle_and_a_backward_import():
    """The checks themselves fail when they should."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer_of("data.loader") < layer_of("engine") < layer_of("promote.registry") < layer_of("serve.serving")
