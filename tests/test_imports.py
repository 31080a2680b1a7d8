"""pyllm's imports flow one way: no module imports, directly or through others, a module that imports it.

The graph is read with ``ast`` from every pyllm/**/*.py and kernels/*.py (installed as ``pyllm.kernels``),
counting imports inside functions too (a lazy import still couples the two modules) and skipping only
``if TYPE_CHECKING:`` blocks. A package's own ``__init__`` running before its submodules is Python's
order, not an edge; ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
"""
import ast
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict[str, str]:
    mods = {}
    for base, prefix in ((os.path.join(ROOT, "pyllm"), "pyllm"), (os.path.join(ROOT, "kernels"), "pyllm.kernels")):
        for path in glob.glob(os.path.join(base, "**", "*.py"), recursive=True):
            rel = os.path.relpath(path, base)[:-3].split(os.sep)
            if rel[0] == "kernels" and prefix == "pyllm":
                continue  # the symlink to ../kernels, read under its installed name above
            parts = [prefix] + [p for p in rel if p != "__init__"]
            mods[".".join(parts)] = path
    return mods


def _extensions() -> set[str]:
    return {"pyllm." + os.path.basename(p).split(".")[0] for p in glob.glob(os.path.join(ROOT, "pyllm", "_C*"))} | {"pyllm._C"}


def _imports(tree: ast.AST):
    """Import nodes outside ``if TYPE_CHECKING:`` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def import_graph() -> dict[str, set[str]]:
    mods, exts = _modules(), _extensions()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods or f"{base}.{a.name}" in exts
                           else base for a in node.names]
            for t in targets:
                while t and t not in mods and t not in exts:
                    t = t.rpartition(".")[0]
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        path.pop()
        state[m] = 2
        return None

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"pyllm.ops.attention", "pyllm.backends", "pyllm.bench.runner", "pyllm.kernels.attention"} <= set(graph)
    assert "pyllm.backends" in graph["pyllm.ops.attention"]  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
