"""The project's modules import in layers: no import circle, counting imports inside functions.

Every module under tvm_scalpel/, passes/ and schedules/ is parsed with ``ast`` (nothing is
imported), and every ``import`` / ``from ... import`` statement in it, at any depth (module
level, functions, ``if TYPE_CHECKING``), is an edge of the graph. ``passes/`` and ``schedules/``
are the packages ``tvm_scalpel.passes`` / ``tvm_scalpel.schedules`` (as they install).

The rules of the graph:

* ``from pkg import name`` is an import of ``pkg.name`` when that is one of our modules (a
  submodule), otherwise of ``pkg`` itself;
* importing ``a.b.c`` is an edge to ``a.b.c`` only. Python runs ``a/__init__`` and
  ``a/b/__init__`` first, but a package's own ``__init__`` importing its own submodules is the
  one allowed kind of edge, and it is the only kind that could otherwise close a circle
  through that implicit parent import;
* so the edges from a package's ``__init__`` to modules inside that package are left out; every
  other edge counts, and the graph must have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"tvm_scalpel": ROOT / "tvm_scalpel", "tvm_scalpel.passes": ROOT / "passes",
            "tvm_scalpel.schedules": ROOT / "schedules"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [] if rel.parts == ("__init__",) else list(rel.parts)
            if parts and parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = path
    return mods


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py"


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        package = name if _is_package(name, mods) else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in mods else source)
            for target in targets:
                if target not in mods or target == name:
                    continue
                if _is_package(name, mods) and target.startswith(name + "."):
                    continue  # a package's __init__ importing its own submodules: allowed
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read():
    graph = import_graph()
    # a few edges known to exist, so an empty graph (a parsing mistake) cannot pass
    assert "tvm_scalpel.passes.rewrite_dense_layers" in graph["tvm_scalpel.passes.rewrite_conv_layers"]
    assert "tvm_scalpel.targets" in graph["tvm_scalpel.passes.pipeline"]
    assert "tvm_scalpel.schedules" in graph["tvm_scalpel.tuning"]  # a function-level import
    assert "tvm_scalpel.api" in graph["tvm_scalpel.cli"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cli_is_on_top():
    """Nothing imports the command line: it parses, calls the library, prints."""
    graph = import_graph()
    assert not [name for name, deps in graph.items() if "tvm_scalpel.cli" in deps]
