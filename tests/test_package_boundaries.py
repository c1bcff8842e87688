"""The library and its reproduction harness stay apart, and imports point one way.

``rethinkbn`` never imports ``rethinkbn_studies`` (the ``rethinkbn reproduce`` / ``studies``
commands come from the studies through the entry point group ``rethinkbn.commands``), and the
studies use only the library's public API: its public modules and the names in their ``__all__``.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PUBLIC_MODULES = ("rethinkbn", "rethinkbn.layers", "rethinkbn.convert", "rethinkbn.population",
                  "rethinkbn.distributed", "rethinkbn.distributed.launch", "rethinkbn.stats")


def _imports(path: Path) -> list[tuple[ast.stmt, str, list[str], bool]]:
    """``(node, module, names, at_top_level)`` for every import statement of ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, a.name, [], id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node, node.module, [a.name for a in node.names], id(node) in top))
    return found


def test_importing_every_library_module_never_imports_the_studies():
    code = (
        "import pkgutil, sys, rethinkbn\n"
        "for m in pkgutil.walk_packages(rethinkbn.__path__, 'rethinkbn.'):\n"
        "    if m.name != 'rethinkbn.integrations.lightning':\n"  # an optional dependency
        "        __import__(m.name)\n"
        "print(sorted(n for n in sys.modules if n.startswith('rethinkbn')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert done.returncode == 0, done.stderr
    loaded = eval(done.stdout)  # a printed list of module names
    assert "rethinkbn.cli" in loaded and "rethinkbn.population" in loaded
    assert not [n for n in loaded if n.startswith("rethinkbn_studies")]


@pytest.mark.parametrize("path", sorted((SRC / "rethinkbn").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(SRC)))
def test_no_library_module_imports_the_studies(path):
    for node, module, _, _ in _imports(path):  # at module level and lazily, in functions
        where = f"{path.relative_to(SRC)}:{node.lineno}"
        assert module.split(".")[0] != "rethinkbn_studies", f"{where} imports {module}"


@pytest.mark.parametrize("path", sorted((SRC / "rethinkbn_studies").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(SRC)))
def test_studies_use_only_the_public_api_of_the_library(path):
    for node, module, names, _ in _imports(path):
        if module.split(".")[0] != "rethinkbn":
            continue
        where = f"{path.relative_to(SRC)}:{node.lineno}"
        assert module in PUBLIC_MODULES, f"{where} imports the private module {module}"
        public = set(importlib.import_module(module).__all__)
        private = [n for n in names if n not in public]
        assert not private, f"{where} imports {private} from {module}, not in its __all__"


# ---------------------------------------------------------------------------- the import graph
# Computed from the source (ast), so it sees every import a module can make: at module level,
# inside functions (lazy imports) and under ``if TYPE_CHECKING:``. Nodes are the modules of both
# packages; ``from pkg import sub`` points at the submodule ``pkg.sub``, ``from pkg import name``
# at ``pkg`` (its ``__init__``). The parent packages that Python runs first are not edges:
# every module would otherwise sit in a circle with its package's ``__init__``.
PACKAGES = ("rethinkbn", "rethinkbn_studies")
ROOT = SRC.parent


def _module_files() -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (path, is_package)}`` for every module of both packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((SRC / package).rglob("*.py")):
            parts = list(path.relative_to(SRC).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = _module_files()


def _internal(name: str) -> str | None:
    """The module of ours that importing ``name`` runs last (its longest known prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of one of our modules in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [_internal(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else _internal(base)
                for alias in node.names
            ]
        else:
            continue
        found += [(node.lineno, t) for t in targets if t is not None]
    return found


def import_graph(extra: tuple[Path, ...] = ()) -> dict[str, dict[str, int]]:
    """``{module: {imported module: first line}}`` for both packages (and ``extra`` files, named
    by their path relative to the repository)."""
    graph: dict[str, dict[str, int]] = {}
    files = [(name, path, name if is_pkg else name.rpartition(".")[0])
             for name, (path, is_pkg) in MODULES.items()]
    files += [(str(p.relative_to(ROOT)), p, "") for p in extra]
    for name, path, package in files:
        edges = graph.setdefault(name, {})
        for line, target in _imported_modules(path, package):
            if target != name:
                edges.setdefault(target, line)
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = {stack.pop()}
            while v not in component:
                component.add(stack.pop())
            if len(component) > 1:
                cycles.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _private_owner(module: str) -> str | None:
    """The package whose private module ``module`` is (``a.b._c`` -> ``a.b``); None if public."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# The benchmarks, the DDP example and the tests' process world use the library only (its process
# helpers live in rethinkbn.distributed.launch): the harness is above them. (The diagnose example
# borrows the studies' MNIST-1D data, model and training loop, which need the `studies` extra.)
GRAPH = import_graph(tuple(sorted([*(ROOT / "benchmarks").glob("*.py"),
                                   ROOT / "examples" / "ddp_train.py",
                                   ROOT / "tests" / "gloo_world.py"])))


def _arrows_up() -> list[tuple[str, str]]:
    return sorted(
        (m, t) for m, edges in GRAPH.items() for t in edges
        if not m.startswith("rethinkbn_studies") and t.split(".")[0] == "rethinkbn_studies"
    )


def _private_imports() -> list[tuple[str, str]]:
    found = []
    for m, edges in GRAPH.items():
        for t in edges:
            owner = _private_owner(t)
            if owner is not None and not _inside(m, owner):
                found.append((m, t))
    return sorted(found)


def _shown(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{m}:{GRAPH[m][t]} imports {t}" for m, t in pairs]


def test_the_import_graph_sees_lazy_and_relative_imports():
    # guards the graph itself: the lazy import of the studies' CLI and a relative one of the
    # library
    assert "rethinkbn_studies.infra.harness" in GRAPH["rethinkbn_studies.cli"]
    assert "rethinkbn.convert.surgery" in GRAPH["rethinkbn.convert"]
    assert "rethinkbn._checks" in GRAPH["rethinkbn.convert.surgery"]
    cycle = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert import_cycles(cycle) == [frozenset("abc")]


def test_no_import_cycle():
    # the last one, the studies' base -> harness -> report -> base, went with issue 19's phase 2
    new = [sorted(c) for c in import_cycles(GRAPH)]
    assert not new, f"import cycles: {new}"


def test_the_studies_are_on_top_and_the_harness_reaches_them_through_the_registry():
    # rethinkbn_studies.studies.* are imported by no other module (the registry imports them by
    # name), and nothing below the harness (the contract, the toolkit, the studies) imports it
    studies = {m for m in MODULES if m.startswith("rethinkbn_studies.studies.")}
    into_studies = [(m, t) for m, edges in GRAPH.items() for t in edges
                    if t in studies and m not in studies]
    assert not into_studies, _shown(into_studies)
    below = ("rethinkbn_studies.contract", "rethinkbn_studies.toolkit", "rethinkbn_studies.studies")
    harness = "rethinkbn_studies.infra.harness"
    into_harness = [(m, harness) for m in GRAPH
                    if any(_inside(m, b) for b in below) and harness in GRAPH[m]]
    assert not into_harness, _shown(into_harness)


def test_no_arrow_up():
    # the library, the benchmarks, the DDP example and tests/gloo_world.py never import the studies
    assert not _arrows_up(), _shown(_arrows_up())


def test_no_module_imports_another_packages_private_module():
    assert not _private_imports(), _shown(_private_imports())


def test_the_convert_package_imports_point_down_its_layers():
    # state -> registry -> norm_act / kinds -> surgery / fold: nothing imports a layer above it
    order = ["state", "registry", "norm_act", "kinds", "surgery", "fold"]
    rank = {f"rethinkbn.convert.{n}": i for i, n in enumerate(order)}
    assert set(rank) == {m for m in MODULES if m.startswith("rethinkbn.convert.")}
    up = [(m, t) for m in rank for t in GRAPH[m] if t in rank and rank[t] >= rank[m]]
    assert not up, _shown(up)
