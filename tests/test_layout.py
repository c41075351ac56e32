"""The code's shape, checked: module sizes, no import cycle, nothing reaching into the sweep's
driver, and every cappy_core module covered by a test file of its name or one its docstring names."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from conftest import REPO

PACKAGES = ("cappy_core", "jobs", "serve_app", "cluster")


def modules() -> dict[str, Path]:
    out = {}
    for root in PACKAGES:
        for path in (REPO / root).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every project module each module imports (module level, functions, TYPE_CHECKING blocks)."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for t in targets:
                hit = resolve(t)
                if hit and hit != name:
                    graph[name].add(hit)
    return graph


def test_no_module_is_over_its_size_limit():
    too_big = []
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        if path.name == "__init__.py":
            limit = 60
        elif name.startswith("cappy_core."):
            limit = 450
        elif name.startswith(("jobs.", "serve_app.")) and not name.startswith("jobs.bench."):
            limit = 300
        else:
            continue
        if lines > limit:
            too_big.append(f"{path.relative_to(REPO)}: {lines} > {limit}")
    assert too_big == []


def test_there_is_no_import_cycle():
    graph = imports(modules())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_only_the_cli_reaches_the_sweeps_driver():
    """The plan, the layout, serve and the benchmarks read the sweep's rules from the Ray-free
    modules, never from the driver (jobs.sweep); the chaos benchmark runs the sweep itself."""
    graph = imports(modules())
    reaching = sorted(m for m, deps in graph.items() if "jobs.sweep" in deps)
    assert reaching == ["jobs.bench.chaos"]


def test_every_cappy_core_module_has_a_test_file_of_its_name_or_names_one():
    tests = {p.name for p in (REPO / "tests").rglob("test_*.py")}
    uncovered = []
    for name, path in modules().items():
        if not name.startswith("cappy_core.") or path.name == "__init__.py":
            continue
        package = path.parent.name
        own = {f"test_{path.stem}.py", f"test_{package}_{path.stem}.py"}
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        named = {m for m in re.findall(r"tests/[\w/]*?(test_\w+\.py)", doc)}
        if not (own | named) & tests:
            uncovered.append(name)
    assert uncovered == []
