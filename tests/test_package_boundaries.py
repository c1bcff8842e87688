"""The library and its reproduction harness stay apart, and imports point one way.

``rethinkbn`` never imports ``rethinkbn_studies`` (only the ``rethinkbn reproduce`` / ``studies``
commands do, when they run), and the studies use only the library's public API: its public
modules and the names in their ``__all__``.
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
                  "rethinkbn.distributed", "rethinkbn.stats")


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
def test_no_library_module_imports_the_studies_except_the_lazy_cli_entry(path):
    for node, module, _, top in _imports(path):
        if module.split(".")[0] == "rethinkbn_studies":
            where = f"{path.relative_to(SRC)}:{node.lineno}"
            assert path.name == "cli.py" and not top, f"{where} imports {module}"


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
