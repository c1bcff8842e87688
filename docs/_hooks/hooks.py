"""mkdocs hooks of the documentation site (``hooks:`` in mkdocs.yml).

- the user guide's plots are computed during the build from the library's code
  (:mod:`plots`), never committed as images;
- ``<!-- benchmark-results -->`` on a page becomes every committed benchmark result,
  ``benchmarks/results/*.md`` (written by ``python benchmarks/run.py``), one section each;
- ``<!-- reproduce-summary:quick -->`` / ``<!-- reproduce-summary:full -->`` become the summary of
  the committed quick / full run, rendered by ``rethinkbn_studies.readme`` from its results.json;
- ``<!-- reproduce-plots:quick -->`` becomes the count and the names of the committed quick
  run's plots, per study, from its results.json;
- ``<!-- cli-help: CMD -->`` becomes the output of ``rethinkbn CMD --help`` (empty CMD: the
  top-level help), from the installed parser;
- ``<!-- diagnose-example -->`` becomes the output of ``python examples/diagnose_mnist1d.py
  --contrast 0.5``, run by the build (about 10 s on one CPU core).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS_MARKER = "<!-- benchmark-results -->"


def benchmark_results(root: Path = ROOT) -> str:
    """Every ``benchmarks/results/*.md`` (sorted by name) under a heading naming its file."""
    parts = []
    for path in sorted((root / "benchmarks" / "results").glob("*.md")):
        parts.append(f"### `benchmarks/results/{path.name}`\n\n{path.read_text().strip()}\n")
    return "\n".join(parts) if parts else "(no committed benchmark results)"


def _studies_module(name: str) -> Any:
    """The harness's module ``name`` wherever its package keeps it (``rethinkbn_studies.name``
    or a sub-package's)."""
    import importlib
    import pkgutil

    import rethinkbn_studies

    for info in pkgutil.walk_packages(rethinkbn_studies.__path__, "rethinkbn_studies."):
        if info.name.rpartition(".")[2] == name:
            return importlib.import_module(info.name)
    raise ImportError(f"rethinkbn_studies has no module {name!r}")


def reproduce_summary(mode: str, root: Path = ROOT) -> str:
    """The summary block of the committed ``mode`` run, as the README's generator renders it."""
    import json

    readme = _studies_module("readme")
    source = Path(f"docs/results/{mode}/results.json")
    body = readme.render(json.loads((root / source).read_text()), str(source), ("", ""))
    return body.strip()


def cli_help(command: str) -> str:
    """``rethinkbn COMMAND --help`` as printed at 100 columns, in a ``text`` block."""
    from rethinkbn.cli import main

    buf = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            main([*command.split(), "--help"])
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return f"```text\n$ rethinkbn {command + ' ' if command else ''}--help\n{buf.getvalue()}```"


def diagnose_example(root: Path = ROOT) -> str:
    """The output of the MNIST-1D diagnosis example, run now, in a ``text`` block."""
    import subprocess
    import tempfile

    command = ["examples/diagnose_mnist1d.py", "--contrast", "0.5"]
    with tempfile.TemporaryDirectory() as cache:
        done = subprocess.run([sys.executable, *command, "--cache", cache], cwd=root,
                              capture_output=True, text=True, timeout=600, check=True)
    return f"```text\n$ python {' '.join(command)}\n{done.stdout}```"


def reproduce_plots(mode: str, root: Path = ROOT) -> str:
    """``N plots: `a.png`, `b.png` (study), ...; none for study`` of the committed ``mode`` run."""
    import json

    studies = json.loads((root / f"docs/results/{mode}/results.json").read_text())["studies"]
    shown = [f"`{plot}` ({name})" for name, study in studies.items() for plot in study["plots"]]
    none = [f"`{name}`" for name, study in studies.items() if not study["plots"]]
    return (f"{len(shown)} plots: {', '.join(shown)}"
            + (f"; none for {', '.join(none)}" if none else ""))


def expand(markdown: str, root: Path = ROOT) -> str:
    """``markdown`` with the markers of this module replaced by what they stand for."""
    markdown = re.sub(r"<!-- cli-help: ?([\w -]*?) ?-->", lambda m: cli_help(m.group(1)), markdown)
    if "<!-- diagnose-example -->" in markdown:
        markdown = markdown.replace("<!-- diagnose-example -->", diagnose_example(root))
    if BENCHMARKS_MARKER in markdown:
        markdown = markdown.replace(BENCHMARKS_MARKER, benchmark_results(root))
    for mode in ("quick", "full"):
        marker = f"<!-- reproduce-summary:{mode} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, reproduce_summary(mode, root))
        marker = f"<!-- reproduce-plots:{mode} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, reproduce_plots(mode, root))
    return markdown


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return expand(markdown)


def on_files(files: Any, config: Any) -> Any:
    import importlib.util

    from mkdocs.structure.files import File

    spec = importlib.util.spec_from_file_location("rethinkbn_docs_plots",
                                                  Path(__file__).with_name("plots.py"))
    assert spec is not None and spec.loader is not None
    plots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plots)
    for path, make in plots.PLOTS.items():
        files.append(File.generated(config, path, content=make()))
    return files
