"""House rules of the package's own source: modules a newcomer can read in one sitting,
imports that run one way.

Both checks read the source (`ast`), never import it:
- no module is over `MAX_LINES` lines, but for today's known offenders, each held to
  its size today;
- the import graph has no cycle, neither between modules nor between wings (each
  subpackage, `engines/` or `hardware/`, taken as one node: a wing that imports a
  top-level module importing the wing back, as `engines/llamacpp.py` and `precision.py`
  did, is a cycle of the wing graph), but for today's known cycles.
A new offender, an offender that grows, or a new cycle fails, naming it; an exception
that is gone must leave its allow-list, so the lists only shrink.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pytest_tokperf"
MAX_LINES = 600

# today's modules over MAX_LINES (main a98f01c, 2026-12-08), each held to that size
# until it is split
OVERSIZED = {
    "report.py": 664,  # 664 lines
    "runner.py": 708,  # 708 lines
}

# today's import cycles, as their edges (importer, imported; names below pytest_tokperf)
KNOWN_CYCLES = {
    ("workloads", "trace"),  # workloads.load imports trace, lazily, to read a trace file
    ("trace", "workloads"),  # trace reuses workloads.json_lines
    ("runner", "sweep"),
    ("sweep", "runner"),  # for the Tokperf type only (TYPE_CHECKING)
    ("runner", "worst"),
    ("worst", "runner"),  # for the Tokperf type only (TYPE_CHECKING)
}


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name below `pytest_tokperf` ("" for the
    package itself, "engines" for engines/__init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def imported(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """The dotted names one import statement names, each as deep as it may go
    (`from pytest_tokperf.engines import precision` names engines.precision, which is a
    module; `from pytest_tokperf.engines import Chunk` names engines.Chunk, which is not)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package upwards
        up = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*up, base] if base else up)
    return [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere: at the top, inside a function
    (lazily) or under TYPE_CHECKING; each is a dependency that must run one way."""
    found = modules()
    graph: dict[str, set[str]] = {name: set() for name in found}
    for name, path in found.items():
        package = "pytest_tokperf" + (f".{name}" if name else "")
        if path.name != "__init__.py":
            package = package.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for dotted in imported(node, package):
                if dotted != "pytest_tokperf" and not dotted.startswith("pytest_tokperf."):
                    continue
                target = dotted.removeprefix("pytest_tokperf").removeprefix(".")
                while target and target not in found:  # a name inside a module
                    target = target.rpartition(".")[0]
                if target != name:
                    graph[name].add(target)
    return graph


def wing(name: str) -> str:
    """The node of a module in the wing graph: a subpackage's modules are its wing."""
    top, _, rest = name.partition(".")
    return top if rest or (PACKAGE / top).is_dir() else name


def wings(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    collapsed: dict[str, set[str]] = {wing(name): set() for name in graph}
    for name, targets in graph.items():
        collapsed[wing(name)] |= {wing(t) for t in targets} - {wing(name)}
    return collapsed


def path(graph: dict[str, set[str]], start: str, end: str) -> list[str] | None:
    """A shortest import path from `start` to `end`, None when there is none."""
    before: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == end:
            steps = [end]
            while steps[-1] != start:
                steps.append(before[steps[-1]])
            return steps[::-1]
        for target in sorted(graph[node]):
            if target not in before and target != start:
                before[target] = node
                queue.append(target)
    return None


def cycle_edges(graph: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    """Each import that lies on a cycle, with one such cycle (a -> b -> ... -> a)."""
    found = {}
    for importer, targets in graph.items():
        for target in targets:
            back = path(graph, target, importer)
            if back is not None:
                found[(importer, target)] = [importer, *back]
    return found


def named(name: str) -> str:
    return name or "pytest_tokperf (the package)"


def test_no_module_is_over_600_lines_but_todays_known_ones_held_to_their_size() -> None:
    sizes = {path.relative_to(PACKAGE).as_posix(): lines(path) for path in modules().values()}
    over = {
        module: (n, OVERSIZED.get(module, MAX_LINES))
        for module, n in sorted(sizes.items())
        if n > OVERSIZED.get(module, MAX_LINES)
    }
    assert not over, "modules over their limit (split them; see DESIGN.md, Wings): " + "; ".join(
        f"{module} {n} lines > {limit}" for module, (n, limit) in over.items()
    )


@pytest.mark.parametrize("level", ["modules", "wings"])
def test_no_import_cycle_but_todays_known_ones(level: str) -> None:
    graph = import_graph() if level == "modules" else wings(import_graph())
    known = KNOWN_CYCLES if level == "modules" else {(wing(a), wing(b)) for a, b in KNOWN_CYCLES}
    new = {edge: cycle for edge, cycle in cycle_edges(graph).items() if edge not in known}
    assert not new, f"new import cycles between {level} (an import that runs back up): " + (
        "; ".join(" -> ".join(map(named, cycle)) for _, cycle in sorted(new.items()))
    )


def test_the_allow_lists_name_only_exceptions_that_still_exist() -> None:
    sizes = {path.relative_to(PACKAGE).as_posix(): lines(path) for path in modules().values()}
    fixed = sorted(m for m in OVERSIZED if sizes.get(m, 0) <= MAX_LINES)
    assert not fixed, f"no longer over {MAX_LINES} lines (or gone): take {fixed} off OVERSIZED"
    broken = sorted(KNOWN_CYCLES - set(cycle_edges(import_graph())))
    assert not broken, f"no longer on an import cycle: take {broken} off KNOWN_CYCLES"


def test_the_checks_see_a_cycle_through_a_wing_and_a_deep_import() -> None:
    """The precision.py case: a wing's module imports a top-level module that imports the
    wing; no module cycle, but the wing graph has one; and a lazy import counts."""
    graph = {
        "": set(),
        "engines": set(),
        "engines.llamacpp": {"precision"},
        "precision": {"engines"},
        "settings": {"engines.llamacpp"},
    }
    assert cycle_edges(graph) == {}
    assert wing("engines.llamacpp") == "engines" and wing("precision") == "precision"
    assert set(cycle_edges(wings(graph))) == {("engines", "precision"), ("precision", "engines")}
    source = ast.parse("def f():\n    from pytest_tokperf.engines import precision, Chunk\n")
    (node,) = [n for n in ast.walk(source) if isinstance(n, ast.ImportFrom)]
    assert imported(node, "pytest_tokperf") == [
        "pytest_tokperf.engines.precision",
        "pytest_tokperf.engines.Chunk",
    ]
