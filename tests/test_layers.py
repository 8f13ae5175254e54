"""The package's layers, read from its import statements: each layer imports only layers below it, and no module
imports itself back through others."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "expo_bench"

LAYERS: list[set[str]] = [
    {"__init__", "errors", "config_model", "metric_keys", "distributed", "reporting"},
    {"contracts", "cache", "comparison_settings", "datafiles"},
    {"optim", "tracking", "comparison", "ui_server"},
    {"train_config", "methods", "evaluation", "leaderboard"},
    {"trainer"},
    {"lm", "tabular"},
    {"tasks"},
    {"recipe"},
    {"sweep"},
    {"runner", "explain"},
    {"pool", "cluster"},
    {"cli"},
    {"__main__"},
]
"""In run order, bottom first: a run starts at the CLI, the runner hands the recipe to its sweep, the sweep runs its
task's data through the language-model or tabular building blocks and the methods, and records in tracking."""

ONLY_IMPORTED_BY = {
    "tracking": {"sweep", "runner", "cli", "leaderboard", "cluster"},
    "leaderboard": {"runner", "cli"},
}
"""Recording is the sweep's business: what a task is, its data and the methods never touch the tracking store."""


def unit(module: str) -> str:
    """``expo_bench.lm.data`` -> ``lm``; ``expo_bench`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """Every expo_bench module ``path`` imports, at any depth of the file (functions and TYPE_CHECKING included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in known}
    return found


def rank(name: str) -> int:
    return next(index for index, layer in enumerate(LAYERS) if name in layer)


def test_every_module_has_a_layer() -> None:
    units = {unit(module) for module in modules()}
    assert units == set().union(*LAYERS)


def test_each_layer_imports_only_below_itself() -> None:
    known = modules()
    wrong = []
    for module, path in known.items():
        for target in imports(path, set(known)):
            source, goal = unit(module), unit(target)
            if source == goal:
                continue
            if rank(goal) >= rank(source) or source not in ONLY_IMPORTED_BY.get(goal, {source}):
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_import_cycles() -> None:
    known = modules()
    graph = {module: imports(path, set(known)) - {module} for module, path in known.items()}
    # a package's __init__ re-exports its modules: importing the package is not importing back from its modules
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if module.startswith(target + "."):
                continue  # a module imports its own package's __init__ (its exports), which imports it: not a cycle
            if state.get(target) == "open":
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_architecture_page_lists_the_layers_top_down() -> None:
    """docs/architecture.md's table names the layers in this order (top row: the highest), every one from ``optim``
    up, and no unit that has no layer."""
    table = (PACKAGE.parent / "docs" / "architecture.md").read_text().split("| layer | what it is |")[1]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    named = [[name.split(".")[0].rstrip("/") for name in re.findall(r"`([^`]+)`", row)] for row in rows]
    ranks = [[rank(name) for name in row] for row in named]
    assert all(min(upper) > max(lower) for upper, lower in itertools.pairwise(ranks)), named
    listed = {name for row in named for name in row}
    assert {name for layer in LAYERS[rank("optim") :] for name in layer} - {"__main__"} <= listed
