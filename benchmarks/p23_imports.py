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
# a function-level import carries its reason on its own line or the line above ("# lazy: ...")
REASON = "lazy:"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def side(module: str) -> str:
    """core (backend.core), web (backend.web), cli (backend.cli*: the one place wiring them) or workers."""
    for prefix, name in (("backend.core", "core"), ("backend.web", "web"), ("backend.cli", "cli"), ("workers", "workers")):
        if module == prefix or module.startswith(prefix + ".") or module.startswith(prefix + "_"):
            return name
    return "other"


def imports(path: Path) -> list[tuple[str, bool, bool]]:
    """(imported module, inside a function, reason given) for each project import in the file;
    every import inside a function counts, project or not, as each one needs its reason."""
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    found = []

    def reasoned(node) -> bool:
        near = lines[max(node.lineno - 3, 0):node.end_lineno]
        return any(REASON in line for line in near)

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # for annotations only: never executed
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, in_function, reasoned(child)))
            elif isinstance(child, ast.Import):
                found.extend((alias.name, in_function, reasoned(child)) for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


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
    lazy, unexplained = 0, []
    graph: dict[str, set[str]] = {}
    for path in files:
        source = module_name(path)
        for target, in_function, reason in imports(path):
            if in_function and target.split(".")[0] not in ("__future__",):
                lazy += 1
                if not reason:
                    unexplained.append(f"{source}: {target}")
            target = target if target in modules else ".".join(target.split(".")[:-1])
            if target not in modules or target == source:
                continue
            edges[(side(source), side(target))] += 1
            graph.setdefault(source, set()).add(target)
    print(f"{len(files)} modules in backend/ and workers/ ({len([m for m in modules if side(m) == 'core'])} core)")
    print("imports between packages (goal: workers and web into core only; cli wires them):")
    for (a, b), n in sorted(edges.items()):
        if a != b:
            print(f"  {a:8} -> {b:8} {n:4} imports")
    print(f"imports inside functions: {lazy} ({len(unexplained)} without their reason)")
    for line in unexplained:
        print("    " + line)
    cycles = loops(graph)
    print(f"import loops (function-level imports included): {len(cycles)}")
    for group in cycles:
        print("    " + " <-> ".join(group))


if __name__ == "__main__":
    main()
