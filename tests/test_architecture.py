"""The package's shape holds: no module reaches into another's private names, and no
imports run in a cycle.

Read from the source (``ast``), not by importing, so a cycle that an import inside a
function hides from the interpreter is still found.  Modules: ``fastddpm/`` and
``kernels/`` (installed as ``fastddpm.kernels``).

* A private name ``_x`` of module ``a.b`` (``from a.b import _x``, ``a.b._x``) is used by
  ``a.b`` alone.  A private *module* ``a._m`` (``fastddpm._C``, ``kernels/_library.py``)
  is its package's: modules inside package ``a`` may import it.
* Import edges are the ``import`` statements anywhere in a module, at top level or
  inside a function; ``from p import m`` is an edge to ``p.m`` when that is a module,
  else to ``p``.  A package's ``__init__`` that runs because a submodule is imported
  is not an edge (Python initialises the parent first, whatever imports it).  The
  registry's load of a backend by name (``importlib.import_module`` of a string in
  ``fastddpm.ops.registry.BACKEND_MODULES``) is a plugin load, not an import statement:
  the backends import ``fastddpm.ops.fakes``/``autograd``, which import nothing of
  the registry.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (module, the private name it uses, of which module): each one a debt with its reason.
ALLOWED_PRIVATE: set[tuple[str, str, str]] = set()
# Function-level imports that close a cycle: debts of the modules outside the op subsystem, each
# with its reason (the test fails on any other cycle, and on an entry no longer needed).
ALLOWED_CYCLE_EDGES: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    found = {}
    for base, prefix in ((ROOT / "fastddpm", "fastddpm"), (ROOT / "kernels", "fastddpm.kernels")):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base)
            if "kernels" in rel.parts and prefix == "fastddpm":  # the symlink fastddpm/kernels -> ../kernels
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()
EXTENSIONS = {"fastddpm._C"}  # compiled: no source here


def _is_module(name: str) -> bool:
    return name in MODULES or name in EXTENSIONS


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module
    package = module if _is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _private_module_use_allowed(user: str, private_module: str) -> bool:
    """A private module ``a._m`` may be imported by the modules of package ``a``."""
    package = private_module.rpartition(".")[0]
    return user == package or user.startswith(package + ".")


def _analyse(module: str, tree: ast.Module):
    """(import edges, private uses as (name, owner module))."""
    edges: set[str] = set()
    private: set[tuple[str, str]] = set()
    aliases: dict[str, str] = {}  # local name -> fastddpm module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fastddpm"):
                    edges.add(a.name)
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(module, node)
            if not source or not source.startswith("fastddpm"):
                continue
            for a in node.names:
                target = f"{source}.{a.name}"
                if _is_module(target):
                    edges.add(target)
                    aliases[a.asname or a.name] = target
                    if _private(a.name) and not _private_module_use_allowed(module, target):
                        private.add((a.name, source))
                else:
                    edges.add(source)
                    if _private(a.name) and source != module:
                        private.add((a.name, source))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if not isinstance(value, ast.Name) or value.id not in aliases:
                continue
            owner = aliases[value.id]
            for attr in reversed(chain[1:]):  # follow submodules: ops.registry._loaded
                if not _is_module(f"{owner}.{attr}"):
                    break
                owner = f"{owner}.{attr}"
            target = f"{owner}.{node.attr}"
            if owner == module or (_is_module(target) and _private_module_use_allowed(module, target)):
                continue
            private.add((node.attr, owner))
    edges.discard(module)
    return {e for e in edges if e in MODULES}, private


@pytest.fixture(scope="module")
def analysis():
    return {name: _analyse(name, ast.parse(path.read_text(), str(path))) for name, path in MODULES.items()}


def test_the_walk_sees_the_package():
    for name in ("fastddpm.ops", "fastddpm.ops.registry", "fastddpm.ops.reference", "fastddpm.engine",
                 "fastddpm.kernels.ops", "fastddpm.kernels._library"):
        assert name in MODULES, name


def test_no_module_uses_another_modules_private_names(analysis):
    found = {(user, name, owner) for user, (_, private) in analysis.items() for name, owner in private}
    assert found - ALLOWED_PRIVATE == set(), sorted(found - ALLOWED_PRIVATE)
    assert ALLOWED_PRIVATE <= found, f"no longer needed, remove from ALLOWED_PRIVATE: {ALLOWED_PRIVATE - found}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles(analysis):
    graph = {name: {e for e in edges if (name, e) not in ALLOWED_CYCLE_EDGES} for name, (edges, _) in analysis.items()}
    assert _cycles(graph) == []
    for user, target in ALLOWED_CYCLE_EDGES:  # each entry still closes a cycle (else remove it)
        with_edge = {name: set(edges) for name, edges in graph.items()}
        with_edge[user].add(target)
        assert any(user in c and target in c for c in _cycles(with_edge)), f"remove ({user!r}, {target!r})"


def test_the_checks_catch_what_they_look_for():
    """A private use and a cycle, planted, are found (the checks can fail)."""
    edges, private = _analyse("fastddpm.engine", ast.parse(
        "from . import ops\nfrom .ops.registry import _loaded\nops.registry._load_errors\nops._x\n"))
    assert private == {("_loaded", "fastddpm.ops.registry"), ("_load_errors", "fastddpm.ops.registry"),
                       ("_x", "fastddpm.ops")}
    assert {"fastddpm.ops", "fastddpm.ops.registry"} <= edges
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
