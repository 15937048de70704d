"""The tree shows the architecture: the import graph has no module-level cycles, runtime/ keeps only its
cross-cutting modules at the top, and each actor package names its actor without importing it."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import grimp

import runtime

PACKAGES = ("runtime", "shm", "actors", "httpd", "kernels")
ACTORS = {"ingress": "IngressActor", "scheduler": "SchedulerActor", "worker": "WorkerActor",
          "detokenizer": "DetokenizerActor", "distributed": "RelayActor"}


def module_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                    cycles.append(sorted(component))
    return cycles


def test_no_module_level_import_cycles():
    graph = grimp.build_graph(*PACKAGES)  # TYPE_CHECKING and function-level imports count too
    assert module_cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for name in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(name)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    graph.add_import(importer="a.y", imported="a.z")
    assert module_cycles(graph) == [["a.x", "a.y"]]


def test_runtime_top_level_holds_at_most_twelve_modules():
    modules = [m.name for m in pkgutil.iter_modules(runtime.__path__) if not m.ispkg]
    assert len(modules) <= 12, modules


def test_actor_packages_name_their_actor_lazily():
    for package, actor in ACTORS.items():
        code = (f"import sys, runtime.{package}; assert 'runtime.{package}.actor' not in sys.modules; "
                f"cls = runtime.{package}.{actor}; assert 'runtime.{package}.actor' in sys.modules; "
                "print(cls.__name__)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == actor


def test_bench_entry_points_keep_their_sglang_names():
    for name in ("runtime.bench_one_batch", "runtime.bench_serving"):
        assert callable(importlib.import_module(name).main)
