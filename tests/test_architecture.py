"""The import structure of ``distill`` and ``callbacks`` (installed as ``distill.callbacks``): no import
cycles, and ``distill.data`` a leaf that imports none of the packages built on it.

Every import statement counts, wherever it stands: at module level, inside a function (a lazy import
still ties the two modules together, it only hides it) and under ``if TYPE_CHECKING:`` (an annotation's
import is a dependency a reader has to follow). ``import a.b.c`` is an edge to the module ``a.b.c``;
``from a.b import c`` is an edge to ``a.b`` and, when ``c`` is a module, to ``a.b.c`` too: a package's
``__init__`` runs first and re-exports its modules, so a module importing from its own package's
``__init__`` closes a circle (import the sibling module by its full name instead). The packages above an
imported module are not counted: every module would otherwise import its package's ``__init__``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"distill": ROOT / "distill", "distill.callbacks": ROOT / "callbacks"}
LEAF = "distill.data"
ABOVE_LEAF = ("teacher", "rollout", "train", "objectives", "pipeline", "callbacks", "cli", "commands")
"""Packages (and modules) of distill built on ``distill.data``, which it must not import."""


def modules(packages: dict[str, Path] = PACKAGES) -> dict[str, Path]:
    found = {}
    for package, root in packages.items():
        for path in sorted(root.rglob("*.py")):
            if package == "distill" and (root / "callbacks") in path.parents:
                continue  # a development symlink to callbacks/: walked as distill.callbacks
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``found`` its import statements name (see the module docstring)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in found.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name].update(t for t in targets if t in found and t != name)
    return graph


def circles(graph: dict[str, set[str]], names: list[str]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in names:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
    return found


def test_the_walk_sees_every_kind_of_import(tmp_path):
    """The walk itself: function-level, TYPE_CHECKING and relative imports are edges, and a module
    importing from its package's ``__init__`` closes a circle."""
    package = tmp_path / "distill"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from distill.sub.a import A\nfrom distill.sub.d import D\n")
    (package / "sub" / "a.py").write_text("def f():\n    from .b import B\nA = 1\n")
    (package / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from distill.c import C\nB = 1\n"
    )
    (package / "sub" / "d.py").write_text("from distill.sub import A\nD = 1\n")
    (package / "c.py").write_text("import distill.sub.b\nC = 1\n")
    found = modules({"distill": package})
    graph = import_graph(found)
    assert graph["distill.sub.a"] == {"distill.sub.b"}
    assert graph["distill.sub.b"] == {"distill.c"}
    assert graph["distill.sub.d"] == {"distill.sub"}
    assert graph["distill.sub"] == {"distill.sub.a", "distill.sub.d"}
    assert sorted(map(sorted, circles(graph, sorted(found)))) == [
        ["distill.c", "distill.sub.b"],
        ["distill.sub", "distill.sub.d"],
    ]


def test_no_import_circles():
    found = modules()
    graph = import_graph(found)
    found_circles = circles(graph, sorted(found))
    assert not found_circles, "import circles (each a set of modules that import one another):\n" + "\n".join(
        " <-> ".join(sorted(c)) for c in found_circles
    )


def test_data_imports_nothing_built_on_it():
    found = modules()
    graph = import_graph(found)
    above = tuple(f"distill.{name}" for name in ABOVE_LEAF)
    upward = sorted(
        (name, target)
        for name, targets in graph.items()
        if name == LEAF or name.startswith(LEAF + ".")
        for target in targets
        if any(target == a or target.startswith(a + ".") for a in above)
    )
    assert not upward, f"{LEAF} must be a leaf; it imports:\n" + "\n".join(f"{a} -> {b}" for a, b in upward)
