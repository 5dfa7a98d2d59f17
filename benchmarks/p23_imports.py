"""Imports between the code's packages, printed: where shared code lives and what reaches where.

    python benchmarks/p23_imports.py

Counts, from the source (ast, nothing imported): imports from the web app (backend/, less its
torch-free core) into workers/, from workers/ into the web app and into the core, imports made
inside functions (to keep torch out of a process), and import loops between modules (strongly
connected groups of two or more). The goal of issue 23: workers/ and the web app import only the
core, never each other, and no loops.
"""
from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the torch-free core the workers need: settings, SQL models and the job queue, the store, rankings
CORE = {"backend.settings", "backend.db", "backend.models", "backend.jobs", "backend.store", "backend.store_schema",
        "backend.rankings", "backend.layer_choice", "backend.labels", "backend.preference"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def side(module: str) -> str:
    if module.startswith("workers"):
        return "workers"
    if module in CORE or module.startswith("backend.core"):
        return "core"
    return "web" if module.startswith("backend") else "other"


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, inside a function) for each project import in the file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, in_function))
            elif isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return [(m, f) for m, f in found if m.split(".")[0] in ("backend", "workers")]


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in list(graph):
        if v not in index:
            connect(v)
    return out


def main() -> None:
    files = [p for d in ("backend", "workers") for p in (ROOT / d).rglob("*.py")]
    modules = {module_name(p) for p in files}
    edges: Counter = Counter()
    in_functions = 0
    graph: dict[str, set[str]] = {}
    for path in files:
        source = module_name(path)
        for target, in_function in imports(path):
            target = target if target in modules else ".".join(target.split(".")[:-1])
            if target not in modules or target == source:
                continue
            edges[(side(source), side(target))] += 1
            in_functions += in_function
            if not in_function:
                graph.setdefault(source, set()).add(target)
    print(f"{len(files)} modules in backend/ and workers/ ({len([m for m in modules if side(m) == 'core'])} core)")
    for (a, b), n in sorted(edges.items()):
        if a != b:
            print(f"  {a:8} -> {b:8} {n:4} imports")
    print(f"  imports inside functions: {in_functions}")
    cycles = loops(graph)
    print(f"  import loops (module level): {len(cycles)}")
    for group in cycles:
        print("    " + " <-> ".join(group))


if __name__ == "__main__":
    main()
