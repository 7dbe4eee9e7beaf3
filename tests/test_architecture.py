"""The package's shape: lazy imports, registration with timm in either import order, no import cycles, no private
names used across modules."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "erf_tools"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) of every import statement, top level or inside functions."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def test_import_of_the_analysis_loads_no_torch():
    result = _run("import erf_tools.analysis, sys; assert 'torch' not in sys.modules, 'torch was imported'")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("code", [
    "import erf_tools, timm; assert type(timm.create_model('uniconvnet_a')).__name__ == 'UniConvNet'",
    "import timm, erf_tools; assert type(timm.create_model('replknet_13')).__name__ == 'RepLKNet'",
    "import erf_tools.layers.parc, timm; timm.create_model('uniconvnet_a')",
])
def test_families_register_with_timm_in_either_import_order(code):
    result = _run(code)
    assert result.returncode == 0, result.stderr


def test_no_import_cycles_between_modules():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for target, names in _imports(path):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in modules and candidate != name:
                    edges.add(candidate)
                    break
        graph[name] = edges
    # a package's __init__ re-exporting its submodules is not a cycle with a submodule importing a sibling
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if nxt.startswith(node + ".") and modules[node].name == "__init__.py":
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt])
                                     if nxt in trail else f"import cycle through {node} -> {nxt}")
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_no_private_names_imported_across_modules():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for target, names in _imports(path):
            if target.startswith("erf_tools"):
                offenders += [f"{_module_name(path)} imports {target}.{n}" for n in names
                              if n.startswith("_") and not n.startswith("__")]
    assert not offenders, offenders
