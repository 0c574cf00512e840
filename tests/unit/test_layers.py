"""The import graph of the project's packages: no cycles, and no new import up the layers.

Layers, bottom to top: schemas, streams, workloads and infra, the services
(ledger, allocator, verifier, node_runner, governance), then destra (client, CLI) on top. A
module may import from its own layer or below. The imports that still run up
(mostly to ``destra.errors`` and ``destra.settings``, which belong at the bottom)
are listed in KNOWN_UPWARD: the list may only shrink. Every import counts,
those inside functions too, since a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LAYER = {
    "schemas": 0,
    "streams": 1,
    "workloads": 2, "infra": 2,
    "ledger": 3, "allocator": 3, "verifier": 3, "node_runner": 3, "governance": 3,
    "destra": 4,
}

# (importer, imported): each to be fixed by moving the imported code down, never added to.
KNOWN_UPWARD = frozenset({
    # destra.errors (now defined in schemas.errors, which new code imports), from below
    ("streams.admin", "destra.errors"),
    ("streams.consumer", "destra.errors"),
    ("streams.faust_app", "destra.errors"),
    ("streams.producer", "destra.errors"),
    ("workloads", "destra.errors"),
    ("workloads.base", "destra.errors"),
    ("workloads.canonical", "destra.errors"),
    ("workloads.matmul", "destra.errors"),
    ("workloads.sha256_search", "destra.errors"),
    ("workloads.sweep", "destra.errors"),
    ("infra.kafka", "destra.errors"),
    ("infra.postgres", "destra.errors"),
    ("infra.services", "destra.errors"),
    ("allocator.placement", "destra.errors"),
    ("allocator.pricing", "destra.errors"),
    ("allocator.service", "destra.errors"),
    ("verifier.proof_of_sync", "destra.errors"),
    ("ledger.book", "destra.errors"),
    ("ledger.decider", "destra.errors"),
    ("ledger.migrate", "destra.errors"),
    ("ledger.processor", "destra.errors"),
    ("ledger.projection", "destra.errors"),
    ("ledger.views", "destra.errors"),
    ("node_runner.runner", "destra.errors"),
    # destra.settings
    ("streams.consumer", "destra.settings"),
    ("streams.faust_app", "destra.settings"),
    ("streams.producer", "destra.settings"),
    ("streams.kafka_runner", "destra.settings"),
    ("infra.services", "destra.settings"),
    ("ledger.processor", "destra.settings"),
    ("ledger.service", "destra.settings"),
    ("ledger.views", "destra.settings"),
    ("node_runner.runner", "destra.settings"),
    # destra.crypto and destra.freshness
    ("allocator.service", "destra.crypto"),
    ("verifier.service", "destra.crypto"),
    ("ledger.decider", "destra.crypto"),
    ("node_runner.runner", "destra.crypto"),
    ("allocator.service", "destra.freshness"),
    ("verifier.service", "destra.freshness"),
    # the node's version, keys, sealed formats and blob store
    ("node_runner.runner", "destra"),
    ("node_runner.runner", "destra.keystore"),
    ("node_runner.runner", "destra.blobs"),
    ("node_runner.runner", "destra.confidential"),
    # node_runner.logic, the node's handler split out of the runner (uncommitted work in
    # progress when this list was made): the same imports as the runner's
    ("node_runner.logic", "destra.confidential"),
    ("node_runner.logic", "destra.crypto"),
    ("node_runner.logic", "destra.errors"),
    ("node_runner.logic", "destra.freshness"),
    # infra up applies the ledger's migrations
    ("infra.services", "ledger.migrate"),
})


@dataclass(frozen=True)
class Import:
    """One import of a project module by another, where it is written."""

    importer: str
    imported: str
    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.importer} -> {self.imported}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    return {_module_name(p): p for package in LAYER for p in sorted((ROOT / package).rglob("*.py"))}


def _known(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a project module (``pkg.mod.attr`` -> ``pkg.mod``)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) or None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolve against the importing package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    # ``from pkg import mod`` imports the submodule; ``from mod import name``, the module.
    return [f"{base}.{alias.name}" for alias in node.names]


def project_imports() -> list[Import]:
    """Every import, at module level or inside a function, of one project module by another."""
    modules = project_modules()
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _targets(node, module, path.name == "__init__.py"):
                imported = _known(target, modules)
                if imported is not None and imported != module:
                    found.append(Import(module, imported, path, node.lineno))
    return list(dict.fromkeys(found))  # once per line, however many names it imports


def _package(module: str) -> str:
    return module.split(".")[0]


def _cycles(edges: Iterable[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def _upward(imports: Iterable[Import]) -> list[Import]:
    return [i for i in imports
            if LAYER[_package(i.imported)] > LAYER[_package(i.importer)]]


def test_the_cycle_finder_finds_cycles_and_only_cycles() -> None:
    assert _cycles([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]) == [["a", "b", "c"]]
    assert _cycles([("a", "b"), ("b", "c"), ("a", "c")]) == []


def test_the_import_scanner_sees_lazy_and_relative_imports() -> None:
    modules = {"pkg": Path("pkg/__init__.py"), "pkg.a": Path("pkg/a.py"), "pkg.b": Path("pkg/b.py")}
    tree = ast.parse("def f():\n    from . import b\n    from pkg.b import thing\n")
    targets = [t for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               for t in _targets(node, "pkg.a", False)]
    assert [_known(t, modules) for t in targets] == ["pkg.b", "pkg.b"]


def test_no_module_imports_itself_through_others() -> None:
    imports = project_imports()
    cycles = _cycles((i.importer, i.imported) for i in imports)
    where = [str(i) for i in imports
             if any(i.importer in c and i.imported in c for c in cycles)]
    assert not cycles, "import cycles:\n" + "\n".join(where)


def test_no_package_imports_itself_through_others_apart_from_known_upward_imports() -> None:
    imports = [i for i in project_imports() if (i.importer, i.imported) not in KNOWN_UPWARD]
    edges = {(_package(i.importer), _package(i.imported)) for i in imports}
    cycles = _cycles((a, b) for a, b in edges if a != b)
    # Downward imports are fine: show those that run sideways or up and close a cycle.
    where = [str(i) for i in imports
             if _package(i.importer) != _package(i.imported)
             and LAYER[_package(i.imported)] >= LAYER[_package(i.importer)]
             and any(_package(i.importer) in c and _package(i.imported) in c for c in cycles)]
    assert not cycles, f"package cycles {cycles}, closed by:\n" + "\n".join(where)


def test_no_new_import_runs_up_the_layers() -> None:
    new = [str(i) for i in _upward(project_imports())
           if (i.importer, i.imported) not in KNOWN_UPWARD]
    assert not new, ("imports up the layers (move the imported code down instead):\n"
                     + "\n".join(new))


def test_the_known_upward_imports_only_shrink() -> None:
    remaining = {(i.importer, i.imported) for i in _upward(project_imports())}
    gone = sorted(KNOWN_UPWARD - remaining)
    assert not gone, f"fixed, so remove them from KNOWN_UPWARD: {gone}"
