"""The engine package's modules import one another without a cycle.

Read statically with ast, so an import counts wherever it is written: at module level, inside a function (a loader's
lazy import of its engine) or under TYPE_CHECKING. An import names a module (`from lmfleet.engine import llamacpp`
names `lmfleet.engine.llamacpp`) or, for a name defined in a module, that module; the parent packages Python
initializes on the way are not counted (a package's `__init__` may import its own submodules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import lmfleet.engine

ENGINE = Path(lmfleet.engine.__file__).parent


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module under `root` (the folder of `package`) by its dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join([package, *parts])] = path
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports."""
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]  # what a relative import starts from
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_the_engine_package_has_no_import_cycle() -> None:
    graph = import_graph(ENGINE, "lmfleet.engine")
    assert "lmfleet.engine.llamacpp" in graph["lmfleet.engine.registry"]  # the graph sees the imports it checks
    assert "lmfleet.engine.transformers.engine" in graph["lmfleet.engine.transformers"]  # lazy ones too
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_cycle_through_a_lazy_or_type_checking_import_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "registry.py").write_text("from pkg import sub\nclass Source: ...\n")
    (pkg / "sub" / "__init__.py").write_text("def load():\n    from pkg.sub.engine import Engine\n")
    (pkg / "sub" / "engine.py").write_text("from . import helpers\n")
    (pkg / "sub" / "helpers.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..registry import Source\n"
    )
    assert find_cycle(import_graph(pkg, "pkg")) == [
        "pkg.registry",
        "pkg.sub",
        "pkg.sub.engine",
        "pkg.sub.helpers",
        "pkg.registry",
    ]
    (pkg / "sub" / "helpers.py").write_text("")
    assert find_cycle(import_graph(pkg, "pkg")) is None
