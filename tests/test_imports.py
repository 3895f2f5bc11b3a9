"""The import graph of the zoo package: no circles, imports that run down the layers of docs/architecture.md, and
every public entry module importable on its own.

The graph is read from the source with `ast`, not by importing. Rule: every ``import`` / ``from ... import`` of a
zoo module counts, wherever it stands: at module level, inside a function (a lazy import that only postpones a
circle is still a circle) and under ``if TYPE_CHECKING:`` (a type a module needs is a module it cannot be read
without). ``from zoo.a import b`` is an edge to the module ``zoo.a.b`` when that is a module, else to ``zoo.a``. The
one edge Python adds by itself, from a submodule to its parent package's ``__init__`` (run first on any import),
does not count: `zoo`'s ``__init__`` is the public facade over everything below it.

Modules and their folders come from ``pyproject.toml``'s ``package-dir``, so a new folder or module is checked
without editing this file, except for its layer when it is not under zoo/ (see `LAYERS`).
"""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module may import modules of its own layer and of the layers below it, never above. A module's
# layer is that of its longest matching prefix; "zoo" (everything else in zoo/) is the library layer.
LAYERS = [
    ("foundation", ["zoo.errors", "zoo.registry", "zoo.images"]),
    ("moe", ["zoo.moe"]),
    ("configs", ["zoo.config", "zoo.hf"]),
    ("parts", ["zoo.encoders", "zoo.connectors", "zoo.lm", "zoo.tokenizer"]),
    ("library", ["zoo"]),
    ("workflows", ["zoo.train", "zoo.eval"]),
    ("commands", ["zoo.cli", "zoo.analyze"]),
]

# Imported each in its own child of a fresh interpreter (the public API and the command line).
ENTRY_MODULES = ["zoo", "zoo.moe", "zoo.lm", "zoo.encoders", "zoo.connectors", "zoo.checkpoint", "zoo.catalogue",
                 "zoo.released", "zoo.convert", "zoo.train", "zoo.eval", "zoo.cli"]


def package_modules() -> dict[str, Path]:
    """Module name -> source file, for every .py file under the folders ``pyproject.toml`` maps into `zoo`."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules = {}
    for package, folder in package_dir.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join([package, *parts[:-1]] + ([] if parts[-1] == "__init__" else [parts[-1]]))
            modules[name] = path
    return modules


def longest_module(name: str, modules: dict[str, Path]) -> str:
    """`name` or its longest prefix that is a module (``import zoo.moe.layer`` -> ``zoo.moe.layer``); "" if none."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_edges(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """Module -> {imported zoo module: line of the first such import} under the rule of the module docstring."""
    edges: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: list[tuple[str, int]] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                imported += [(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source, node.lineno)
                             for alias in node.names]
        targets: dict[str, int] = {}
        for target, line in imported:
            target = longest_module(target, modules) if target.split(".")[0] == "zoo" else ""
            if target and target != name:
                targets.setdefault(target, line)
        edges[name] = targets
    return edges


def circles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One circle (a list of modules, the first repeated at the end) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:  # Tarjan; the graph has ~150 nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(shortest_circle(v, component, edges))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def shortest_circle(start: str, component: set[str], edges: dict[str, dict[str, int]]) -> list[str]:
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w in component and w not in previous:
                    previous[w] = v
                    following.append(w)
        if start in previous:
            break
        frontier = following
    path = [start]
    while path[-1] != start or len(path) == 1:
        path.append(previous[path[-1]])
    return path[::-1]


def describe(circle: list[str], edges: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    return "\n".join(f"  {a} ({modules[a].relative_to(ROOT)}:{edges[a][b]}) -> {b}" for a, b in zip(circle, circle[1:]))


@functools.cache
def zoo_graph() -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    modules = package_modules()
    return modules, import_edges(modules)


def layer_of(module: str) -> int:
    best, layer = -1, 0
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), i
    return layer


def test_import_graph_has_no_circles():
    modules, edges = zoo_graph()
    found = circles(edges)
    assert not found, "import circles:\n" + "\n\n".join(describe(c, edges, modules) for c in found)


def test_the_graph_reader_sees_lazy_type_checking_and_relative_imports(tmp_path):
    """The reader itself can fail: a circle closed only by a function-level or TYPE_CHECKING import is found."""
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from zoo.b import B\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import c\n")
    (tmp_path / "c.py").write_text("import zoo.a\n")
    (tmp_path / "__init__.py").write_text("")
    modules = {"zoo": tmp_path / "__init__.py", **{f"zoo.{n}": tmp_path / f"{n}.py" for n in "abc"}}
    edges = import_edges(modules)
    assert edges == {"zoo": {}, "zoo.a": {"zoo.b": 3}, "zoo.b": {"zoo.c": 2}, "zoo.c": {"zoo.a": 1}}
    assert circles(edges) == [["zoo.a", "zoo.b", "zoo.c", "zoo.a"]]


def test_imports_run_down_the_layers():
    """docs/architecture.md's layers: e.g. zoo.moe imports no config, no part imports the model, the library never
    imports zoo.train or zoo.eval (only the commands do)."""
    modules, edges = zoo_graph()
    upward = [f"  {a} ({LAYERS[layer_of(a)][0]}, {modules[a].relative_to(ROOT)}:{line}) -> {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in sorted(edges.items()) for b, line in targets.items() if layer_of(b) > layer_of(a)]
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)
    assert layer_of("zoo.moe.routing") == 1 and layer_of("zoo.model") == 4 and layer_of("zoo.cli") == 6


# One fresh interpreter imports the third-party packages the zoo imports at module level (most of the ~7 s of an
# import), then forks one child per entry module, all at once; each child starts with no zoo module loaded and imports
# its module alone, so an import that works only after another zoo module was imported fails here.
_IMPORT_EACH = textwrap.dedent("""
    import importlib, os, sys, traceback
    for name in sys.argv[2].split(","):
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # an optional package: the child that needs it reports it
    assert not any(m == "zoo" or m.startswith("zoo.") for m in sys.modules)
    children = {}
    for module in sys.argv[1].split(","):
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(module)
            except BaseException:
                print(f"--- import {module}", file=sys.stderr)
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(1)
            os._exit(0)
        children[pid] = module
    print(",".join(sorted(module for pid, module in children.items() if os.waitpid(pid, 0)[1] != 0)))
""")


def third_party_modules(modules: dict[str, Path], edges: dict[str, dict[str, int]]) -> list[str]:
    """Top-level packages, other than the standard library's and zoo's, that the zoo modules reachable from
    `ENTRY_MODULES` import at module level (an optional extra's adapter, such as zoo.eval.lmms_model, is left out)."""
    reachable, todo = set(), list(ENTRY_MODULES)
    while todo:
        module = todo.pop()
        if module not in reachable:
            reachable.add(module)
            todo.extend(edges[module])
    names = set()
    for module in reachable:
        for node in ast.parse(modules[module].read_text()).body:
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return sorted(names - set(sys.stdlib_module_names) - {"zoo", "__future__"})


def test_each_public_module_imports_on_its_own():
    modules, edges = zoo_graph()
    assert set(ENTRY_MODULES) <= set(modules)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _IMPORT_EACH, ",".join(ENTRY_MODULES),
                          ",".join(third_party_modules(modules, edges))],
                         cwd=ROOT / "tests", env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    failed = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert not failed, f"these modules do not import on their own: {failed}\n{run.stderr[-4000:]}"
