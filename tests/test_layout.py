"""The package's import layout, read from the source (AST, nothing imported): no import cycles
among our modules (in-function imports count: a lazy import only hides a cycle), no private
name imported across modules, and no training library imported by serving code.

See STYLE.md: "Helpers live below their users" and "Serving/runtime code must never import
torch" (the runtime checks, in a fresh process, are in test_predictor.py and test_serve.py).
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "lensforge"
HEAVY = ("torch", "torchvision", "timm", "lightning", "pytorch_lightning", "sklearn")  # train extra only
SERVING = ("lensforge.runtime", "lensforge.serve")  # installed without the train extra
@dataclass(frozen=True)
class Import:
    """One import statement's edge, as written."""

    importer: str  # module name, e.g. "lensforge.data.coco"
    target: str  # the imported module, e.g. "lensforge.data.files" (or "torch")
    names: tuple[str, ...]  # the names a ``from`` import takes; () for ``import x``
    line: int
    in_function: bool


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, list[Path]] = {}  # name -> files (lensforge.cli may be a module or a package while it moves)
for _path in sorted((SRC / PACKAGE).rglob("*.py")):
    MODULES.setdefault(_module_name(_path), []).append(_path)


def _is_package(name: str) -> bool:
    return any(p.name == "__init__.py" for p in MODULES.get(name, ()))


def _own(name: str) -> str | None:
    """The longest module of ours that ``name`` is or lies in (None: not ours)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(module: str | None, level: int, importer: str) -> str:
    """``from .x import y`` in ``importer`` → the absolute module name."""
    if not level:
        return module or ""
    base = importer if _is_package(importer) else importer.rpartition(".")[0]
    for _ in range(level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{module}" if module else base


def _walk(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Import statements with whether they sit in a function; ``if TYPE_CHECKING:`` bodies
    are skipped (never executed)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        elif isinstance(child, ast.If) and _is_type_checking(child):
            for sub in child.orelse:
                yield from _walk(ast.Module(body=[sub], type_ignores=[]), in_function)
        else:
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from _walk(child, nested)


def _imports(name: str) -> list[Import]:
    out: list[Import] = []
    for path in MODULES[name]:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, in_function in _walk(tree):
            if isinstance(node, ast.Import):
                out.extend(Import(name, a.name, (), node.lineno, in_function) for a in node.names)
                continue
            module = _absolute(node.module, node.level, name)
            for a in node.names:
                # ``from lensforge.data import files`` imports the submodule lensforge.data.files
                sub = f"{module}.{a.name}"
                target = sub if sub in MODULES else module
                out.append(Import(name, target, (a.name,), node.lineno, in_function))
    return out


IMPORTS = {name: _imports(name) for name in MODULES}


def _edges(module_level_only: bool = False) -> dict[str, set[str]]:
    """Our module → our modules it imports, without a package's edges to its own submodules
    (a package re-exporting its parts is not a cycle)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, imports in IMPORTS.items():
        for imp in imports:
            target = _own(imp.target)
            if target is None or target == name or target.startswith(name + "."):
                continue
            if module_level_only and imp.in_function:
                continue
            graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def _describe(cycle: list[str], graph: dict[str, set[str]]) -> str:
    """The cycle's modules and, for each, the import lines that close it."""
    members = set(cycle)
    lines = []
    for name in cycle:
        for imp in IMPORTS[name]:
            target = _own(imp.target)
            if target in members and target != name and target in graph[name]:
                where = "in a function" if imp.in_function else "module level"
                lines.append(f"    {name}:{imp.line} imports {target} ({where})")
    return " <-> ".join(cycle) + "\n" + "\n".join(sorted(set(lines)))


# --------------------------------------------------------------------------- the scanner itself


def test_the_scanner_sees_the_package() -> None:
    # guards against a test that passes because it reads nothing
    assert len(MODULES) > 30 and "lensforge.data.formats" in MODULES
    assert "lensforge.data.coco" in _edges()["lensforge.data.formats"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_scanner_skips_type_checking_and_counts_lazy_imports() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import typed_only\nelse:\n    import at_runtime\n"
        "def f():\n    import lazy\n"
    )
    found = {(n.names[0].name, lazy) for n, lazy in _walk(tree) if isinstance(n, ast.Import)}
    assert found == {("at_runtime", False), ("lazy", True)}


# --------------------------------------------------------------------------- the rules


def test_no_import_cycles() -> None:
    graph = _edges()
    cycles = _cycles(graph)
    assert not cycles, (
        "import cycles among lensforge modules (in-function imports count: move the shared part "
        "down into a module both can import):\n" + "\n".join(_describe(c, graph) for c in cycles)
    )


def test_no_private_names_imported_across_modules() -> None:
    bad = [
        f"{imp.importer}:{imp.line} imports {name} from {imp.target}"
        for imports in IMPORTS.values()
        for imp in imports
        if _own(imp.target) not in (None, imp.importer)
        for name in imp.names
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
    ]
    assert not bad, "private names imported across modules (make them public, or move them):\n" + "\n".join(bad)


def _module_level_heavy(name: str) -> list[Import]:
    return [
        imp for imp in IMPORTS[name]
        if not imp.in_function and imp.target.split(".")[0] in HEAVY
    ]


SERVING_MODULES = sorted(n for n in MODULES if n in SERVING or n.startswith(tuple(s + "." for s in SERVING)))


def test_serving_modules_import_no_training_library_at_module_level() -> None:
    assert SERVING_MODULES, "no runtime/serve modules found"
    bad = [
        f"{imp.importer}:{imp.line} imports {imp.target}"
        for name in SERVING_MODULES
        for imp in _module_level_heavy(name)
    ]
    assert not bad, (
        f"runtime/ and serve/ must not import {', '.join(HEAVY)} at module level (serving installs "
        "lack them; import inside the function that needs them, with the reason):\n" + "\n".join(bad)
    )


def _loaded_with(name: str) -> dict[str, str]:
    """Our modules that importing ``name`` executes (module-level imports, transitively, plus
    the packages above each), each with the module that first pulled it in."""
    graph = _edges(module_level_only=True)
    parent: dict[str, str] = {name: ""}
    todo = deque([name])  # breadth first: each module's chain is a shortest one
    while todo:
        v = todo.popleft()
        nexts = set(graph[v])
        up = v.rpartition(".")[0]
        while up:  # importing a.b.c runs a/__init__ and a/b/__init__ first
            if up in MODULES:
                nexts.add(up)
            up = up.rpartition(".")[0]
        for w in sorted(nexts):
            if w not in parent:
                parent[w] = v
                todo.append(w)
    return parent


def test_serving_modules_do_not_reach_a_training_library_through_our_modules() -> None:
    shortest: dict[tuple[str, int], list[str]] = {}  # (offending module, line) -> import chain
    for name in SERVING_MODULES:
        parent = _loaded_with(name)
        for mod in parent:
            for imp in _module_level_heavy(mod):
                chain = [mod]
                while parent[chain[-1]]:
                    chain.append(parent[chain[-1]])
                key = (f"{mod}:{imp.line} imports {imp.target}", imp.line)
                if key not in shortest or len(chain) < len(shortest[key]):
                    shortest[key] = chain
    bad = [f"{key[0]}, loaded by {' -> '.join(reversed(chain))}" for key, chain in sorted(shortest.items())]
    assert not bad, "serving code pulls in a training library at import time:\n" + "\n".join(bad)
