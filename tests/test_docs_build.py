"""The docs build's hooks (docs/_hooks): what they insert is computed from the code and the
committed artifacts. (`mkdocs build --strict` itself runs in .ci/run, with the docs extra.)"""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    path = ROOT / "docs" / "_hooks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"docs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_help_marker_becomes_the_parsers_help_with_its_docs_page():
    text = load("hooks").expand("<!-- cli-help: diagnose -->")
    assert text.startswith("```text\n$ rethinkbn diagnose --help\nusage: rethinkbn diagnose")
    assert "docs/guide/diagnose.md" in text and text.endswith("```")


def test_reproduce_plots_marker_counts_the_committed_quick_runs_plots():
    text = load("hooks").expand("<!-- reproduce-plots:quick -->")
    pngs = sorted(p.name for p in (ROOT / "docs/results/quick").glob("*.png"))
    assert text.startswith(f"{len(pngs)} plots: ")
    assert sorted(re.findall(r"`(\w+\.png)`", text)) == pngs
    studies = json.loads((ROOT / "docs/results/quick/results.json").read_text())["studies"]
    for name in (n for n, s in studies.items() if not s["plots"]):
        assert "none for" in text and f"`{name}`" in text


def test_reproduce_summary_marker_is_the_readme_generators_block():
    pytest.importorskip("rethinkbn_studies")
    readme = (ROOT / "README.md").read_text()
    text = load("hooks").expand("<!-- reproduce-summary:quick -->")
    assert text.splitlines()[0] in readme  # the head line, as the README's generated block has it


@pytest.mark.parametrize("name", ["guide/img/nbs_inconsistency.png",
                                  "guide/img/ema_vs_population.png"])
def test_every_guide_plot_is_computed_and_used_by_a_page(name):
    pytest.importorskip("matplotlib")
    plots = load("plots")
    png = plots.PLOTS[name]()
    assert png.startswith(b"\x89PNG")
    page = ROOT / "docs" / Path(name).parent.parent
    assert any(f"img/{Path(name).name}" in p.read_text() for p in page.glob("*.md")), name
