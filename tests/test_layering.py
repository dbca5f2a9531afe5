"""The package's import graph: no cycle, and `mglightning/models/` (plain networks) imports no higher layer.

Read from the source with `ast`, every `import` counted, also those inside functions (a lazy import that closes a
circle is still a circle: it only hides it until the function runs).
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mglightning"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """`{module: the mglightning modules it imports}`; `from a.b import c` counts as `a.b.c` when that is a module."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, `level - 1` folders up
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                               for alias in node.names)
        resolved = set()
        for target in targets:
            while target and target not in modules:  # `a.b.function` -> `a.b`
                target = target.rpartition(".")[0]
            if target.startswith("mglightning") and target != name:
                resolved.add(target)
        graph[name] = resolved
    return graph


def subpackage(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    # Known edges, so that a parser that finds nothing cannot pass the tests below.
    assert "mglightning.models.registry" in graph["mglightning.models.loading"]
    assert "mglightning.models" in graph["mglightning.modules.classifier"]
    assert "mglightning.modules.evaluator" in graph["mglightning.evaluate_cli"]  # imported inside evaluate_main


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as error:
        raise AssertionError(f"import cycle between modules: {' -> '.join(error.args[1])}") from None
    # The same between subpackages (models, modules, explainers, ...): a cycle there is a layering error
    # even when no two modules import each other.
    layers: dict[str, set[str]] = {}
    for name, targets in graph.items():
        layers.setdefault(subpackage(name), set()).update(
            subpackage(target) for target in targets if subpackage(target) != subpackage(name)
        )
    try:
        tuple(TopologicalSorter(layers).static_order())
    except CycleError as error:
        raise AssertionError(f"import cycle between subpackages: {' -> '.join(error.args[1])}") from None


def test_models_imports_no_higher_layer():
    graph = import_graph()
    upward = {
        f"{name} -> {target}"
        for name, targets in graph.items() if name.startswith("mglightning.models")
        for target in targets if not target.startswith("mglightning.models")
    }
    assert not upward, f"mglightning/models/ holds plain networks and imports only itself: {sorted(upward)}"


def test_checks_is_the_bottom_floor():
    """`mglightning/checks.py` (the argument checks every subpackage shares) imports nothing from the package, and
    the explainers, attacks and metrics take their checks from it."""
    graph = import_graph()
    assert graph["mglightning.checks"] == set(), sorted(graph["mglightning.checks"])
    for user in ("mglightning.explainers.base", "mglightning.attacks._common", "mglightning.metrics.fidelity"):
        assert "mglightning.checks" in graph[user], user


# The floors of docs/architecture.md: a module imports only from lower floors (same-floor packages are
# independent). Top-level modules count as packages of their own.
FLOORS = {
    "checks": 0, "random": 0, "models": 0, "data": 0, "checkpointing": 0, "cli_common": 0,
    "explainers": 1, "units": 1,
    "metrics": 2,
    "attacks": 3,
    "evaluation": 4,
    "reporting": 5,
    "modules": 6, "paper_figures": 6, "integrations": 6,
    "train_cli": 7, "evaluate_cli": 7, "frontier": 7,
    "mglightning": 8, "cli": 8,
}
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"
MAX_MODULE_LINES = 450


def floor_of(name: str) -> int:
    part = subpackage(name).removeprefix("mglightning.")
    if part not in FLOORS:
        raise AssertionError(f"{part} has no floor: place it in FLOORS here and in docs/architecture.md")
    return FLOORS[part]


def test_every_import_goes_down_a_floor():
    graph = import_graph()
    wrong = sorted(
        f"{name} (floor {floor_of(name)}) -> {target} (floor {floor_of(target)})"
        for name, targets in graph.items() for target in targets
        if subpackage(target) != subpackage(name) and floor_of(target) >= floor_of(name)
    )
    assert not wrong, "imports that go sideways or up (docs/architecture.md):\n" + "\n".join(wrong)


def test_the_architecture_page_draws_these_floors():
    text = ARCHITECTURE.read_text()
    diagram = text.split("```text\n", 1)[1].split("```", 1)[0]
    drawn = {}
    for line in diagram.splitlines():
        floor, *rest = line.split()
        for word in " ".join(rest).split():
            if word in FLOORS:
                drawn[word] = int(floor)
    assert drawn == FLOORS


def test_no_module_is_over_the_size_limit():
    long = {str(path.relative_to(PACKAGE.parent)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these by concern (docs/architecture.md, 'Module size'): {long}"
