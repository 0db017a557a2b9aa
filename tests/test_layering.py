"""The folders are the architecture: no import cycle, the layer contract holds, few top modules."""

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")

ROOT = Path(__file__).resolve().parents[1]
# An issue number, or a development session ("session 2", "this session"); a GPU session of the
# benchmarks is a word of the code, not a citation.
CITATION = re.compile(
    r"issue[ -]?[0-9]|\bsession [0-9]|\b(this|previous|earlier|last) session\b", re.IGNORECASE
)


def _graph():
    return grimp.build_graph("fastsparse", include_external_packages=False)


def _cycles(graph) -> list:
    """Strongly connected components of more than one module (Tarjan), module level."""
    modules = sorted(graph.modules)
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
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
                found.append(sorted(component))

    for m in modules:
        if m not in index:
            visit(m)
    return found


def test_no_import_cycle_between_modules():
    graph = _graph()
    # An __init__ re-exporting its submodules is not a cycle of the code; leave packages out.
    packages = {m for m in graph.modules if (ROOT / m.replace(".", "/")).is_dir()}
    for p in packages:
        graph.remove_module(p)
    assert _cycles(graph) == []


def _rooms() -> list:
    """Every subpackage and top module of fastsparse (the rooms the layers contract must name)."""
    package = ROOT / "fastsparse"
    rooms = [f"fastsparse.{p.name}" for p in package.iterdir() if (p / "__init__.py").is_file()]
    rooms += [f"fastsparse.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"]
    return sorted(rooms)


def _layers() -> list:
    """The rooms named by the layers contract of pyproject.toml, from the top."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    return [re.split(r"\s*[|:]\s*", layer.strip()) for layer in contract["layers"]]


def _room_graph(graph, depth: int):
    """The import graph of whole rooms: a module counts as its first `depth` name parts."""
    rooms = grimp.ImportGraph()
    names = {m: ".".join(m.split(".")[:depth]) for m in graph.modules if m.count(".") >= 1}
    for room in set(names.values()):
        rooms.add_module(room)
    for importer, room in names.items():
        for imported in graph.find_modules_directly_imported_by(importer):
            other = names.get(imported)
            if other is not None and other != room:
                rooms.add_import(importer=room, imported=other)
    return rooms


def test_the_layers_contract_names_every_subpackage_and_top_module():
    named = sorted(room for layer in _layers() for room in layer)
    assert named == _rooms()


@pytest.mark.parametrize("depth", [2, 3])
def test_no_import_cycle_between_packages(depth):
    # depth 2: fastsparse.core, fastsparse.backends, ...; depth 3: also fastsparse.backends.triton
    assert _cycles(_room_graph(_graph(), depth)) == []


def test_the_package_never_imports_the_benchmark_harness():
    graph = grimp.build_graph("fastsparse", include_external_packages=True)
    assert "torch" in graph.modules  # external imports are in this graph
    assert "benchmarks" not in graph.modules


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter not installed")
def test_a_planted_upward_import_breaks_the_layers_contract(tmp_path):
    # A copy of the package in which the bottom layer imports the top one.
    shutil.copytree(
        ROOT / "fastsparse",
        tmp_path / "fastsparse",
        ignore=shutil.ignore_patterns("__pycache__", "*.npz", "*.cpp", "*.cu", "*.h"),
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    planted = tmp_path / "fastsparse" / "core" / "contract.py"
    planted.write_text(planted.read_text() + "\nfrom fastsparse.workflow import cli  # noqa\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        ["lint-imports", "--no-cache"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0, out.stdout
    assert "BROKEN" in out.stdout and "fastsparse.core.contract -> fastsparse.workflow.cli" in (
        out.stdout
    ), out.stdout


def test_no_module_re_exports_another_packages_names():
    # `__all__` lists what a module defines; a package's __init__ collects its own modules'
    # names, and only the package root gathers the public API from everywhere.
    offenders = []
    for path in sorted((ROOT / "fastsparse").rglob("*.py")):
        if path == ROOT / "fastsparse" / "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        exported = [
            element.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and any(getattr(t, "id", "") == "__all__" for t in node.targets)
            for element in node.value.elts
        ]
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        for node in tree.body:
            if not isinstance(node, ast.ImportFrom):
                continue
            own = path.name == "__init__.py" and (node.module or "").startswith(package + ".")
            for alias in node.names:
                if (alias.asname or alias.name) in exported and not own:
                    offenders.append(f"{path.relative_to(ROOT)}: {alias.name} from {node.module}")
    assert offenders == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for m in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(m)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.z")
    graph.add_import(importer="a.z", imported="a.x")
    assert _cycles(graph) == [["a.x", "a.y", "a.z"]]


def test_at_most_a_dozen_modules_directly_in_the_package():
    top = [p for p in (ROOT / "fastsparse").glob("*.py")]
    assert len(top) <= 12, sorted(p.name for p in top)


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter not installed")
def test_layer_contracts_hold():
    out = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_no_comment_cites_an_issue_or_a_session():
    offenders = []
    sources = list((ROOT / "fastsparse").rglob("*.py")) + list((ROOT / "benchmarks").glob("*.py"))
    for path in sources:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if CITATION.search(line) or re.search(r"(?<!docs/)DESIGN\.md", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
