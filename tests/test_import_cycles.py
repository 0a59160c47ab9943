"""No import cycle inside the slimdeploy package: every module's imports of other slimdeploy
modules (at the top or inside a function, where a cycle hides best) form a graph without a
cycle. Read with ``ast``, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` under the package folder ``root``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → the modules of the same package it imports anywhere in its body. ``from a.b
    import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``; relative
    imports are resolved against the importing module's package."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in modules:
                        targets.add(full)
                    elif base in modules:
                        targets.add(base)
        targets.discard(name)
        graph[name] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle met by a depth-first walk, each as the path ``[a, b, ..., a]``."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(REPO / "slimdeploy")
    assert "slimdeploy.zoo.train" in graph and "slimdeploy.zoo.training" in graph["slimdeploy.zoo.train_gated"]
    cycles = import_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_walk_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    """The shape the zoo had: a dispatcher importing its recipes inside a function, the recipes
    importing the dispatcher's helpers at the top (one of them relatively)."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "train.py").write_text("def dispatch():\n    from pkg.sub.recipe import run\n    return run\n")
    (package / "sub" / "recipe.py").write_text("from .train import dispatch\n\ndef run():\n    return dispatch\n")
    (package / "sub" / "helpers.py").write_text("import pkg.sub\n")
    graph = import_graph(package)
    assert graph["pkg.sub.train"] == {"pkg.sub.recipe"}
    assert graph["pkg.sub.recipe"] == {"pkg.sub.train"}
    assert graph["pkg.sub.helpers"] == {"pkg.sub"}
    assert import_cycles(graph) == [["pkg.sub.recipe", "pkg.sub.train", "pkg.sub.recipe"]]

    # Moving the shared part into its own module breaks the cycle.
    (package / "sub" / "recipe.py").write_text("from pkg.sub.helpers import *\n")
    assert import_cycles(import_graph(package)) == []
