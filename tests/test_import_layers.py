"""The package's layers (import-linter contract in pyproject.toml) and its file import graph (no cycles).

Both count every import: module-level, function-level and ``TYPE_CHECKING`` ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def file_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` ({module: modules it imports}): its strongly connected components of more
    than one module, and modules that import themselves (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
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
                if len(component) > 1 or node in graph.get(node, ()):
                    cycles.append(sorted(component))
    return cycles


def meshplan_file_graph() -> dict[str, set[str]]:
    graph = grimp.build_graph("meshplan", include_external_packages=False, exclude_type_checking_imports=False,
                              cache_dir=None)
    return {module: set(graph.find_modules_directly_imported_by(module)) for module in graph.modules}


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the ``meshplan`` package and ``pyproject.toml`` found in ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", LINT_IMPORTS, "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_no_import_cycle_between_files():
    cycles = file_cycles(meshplan_file_graph())
    assert not cycles, "import cycles between meshplan files:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_reports_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}, "e": set()}
    assert file_cycles(graph) == [["a", "b", "c"], ["d"]]


def test_layers_contract_is_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("importer, imported", [
    ("core/naming.py", "..api"),                    # core imports nothing above it, not even in a function
    ("tensor_parallel/validation.py", "..planning.dispatch"),  # an axis calls up into planning
    ("tensor_parallel/matching.py", "..context_parallel.apply"),  # siblings in one layer stay independent
])
def test_a_violation_breaks_the_contract(tmp_path, importer, imported):
    shutil.copytree(REPO / "meshplan", tmp_path / "meshplan", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / "meshplan" / importer, "a") as source:
        source.write(f"\n\ndef _reaches_up():\n    from {imported} import __name__ as name\n\n    return name\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    module = "meshplan." + importer.removesuffix(".py").replace("/", ".")
    assert f"{module} -> meshplan.{imported.removeprefix('..')}" in result.stdout
