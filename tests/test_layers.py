"""The package keeps its shape: the layers and the independence of the formats written in pyproject.toml
(import-linter), no import circle between modules, and no module importing another module's private
names. Each check is also shown failing on a copy of the package with one bad import put in."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minicpm_compress"
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=package_parent,
                          env=env, capture_output=True, text=True, timeout=300)


def _circles(package_parent: Path) -> list[list[str]]:
    """Groups of modules that import each other, directly or not (strongly connected components of the
    import graph; imports under TYPE_CHECKING excluded), in a child process so `package_parent` is the one
    analysed."""
    script = r"""
import json, sys, grimp
sys.setrecursionlimit(10000)
g = grimp.build_graph("minicpm_compress", exclude_type_checking_imports=True)
adj = {m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules}
index, low, stack, on, out = {}, {}, [], set(), []
def visit(v):
    index[v] = low[v] = len(index); stack.append(v); on.add(v)
    for w in adj[v]:
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        group = []
        while True:
            w = stack.pop(); on.discard(w); group.append(w)
            if w == v: break
        if len(group) > 1: out.append(sorted(group))
for m in sorted(adj):
    if m not in index: visit(m)
print(json.dumps(out))
"""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=package_parent, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _private_imports(package: Path) -> list[str]:
    """`from <a module of the package> import _name` anywhere in the package."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(package.name)):
                found += [f"{path.relative_to(package.parent)}:{node.lineno} imports {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return found


@pytest.fixture(scope="module")
def broken_copy(tmp_path_factory) -> Path:
    """A copy of the package where models/checkpoint.py imports state (a layer above it, which imports
    models): an upward import and a circle, and a private name imported across modules."""
    parent = tmp_path_factory.mktemp("broken")
    shutil.copytree(PACKAGE, parent / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    checkpoint = parent / PACKAGE.name / "models" / "checkpoint.py"
    text = checkpoint.read_text()
    anchor = "from __future__ import annotations\n"
    checkpoint.write_text(text.replace(anchor, anchor + "\nfrom ..state import _config_json  # noqa: F401\n", 1))
    return parent


def test_the_layers_and_format_independence_hold():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_an_upward_import_breaks_the_layers_contract(broken_copy):
    done = _lint(broken_copy)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout
    assert "minicpm_compress.models.checkpoint -> minicpm_compress.state" in done.stdout


def test_no_module_is_part_of_an_import_circle(broken_copy):
    assert _circles(ROOT) == []
    circles = _circles(broken_copy)
    assert any({"minicpm_compress.models.checkpoint", "minicpm_compress.state"} <= set(c) for c in circles)


def test_no_module_imports_a_private_name_of_another(broken_copy):
    assert _private_imports(PACKAGE) == []
    (found,) = _private_imports(broken_copy / PACKAGE.name)
    assert found.startswith("minicpm_compress/models/checkpoint.py:") and found.endswith("imports _config_json")
