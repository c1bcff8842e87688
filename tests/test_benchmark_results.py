"""The docs' benchmark tables are the committed artifacts that the benchmarks wrote (the docs
build renders every benchmarks/results/*.md into the Benchmarks page, docs/_hooks/hooks.py)."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def rendered_benchmarks_page() -> str:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs/_hooks/hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert hooks.BENCHMARKS_MARKER in page, "docs/benchmarks.md shows no benchmark results"
    return hooks.expand(page, ROOT)


def test_docs_ghost_table_is_the_committed_result_file():
    result = (ROOT / "benchmarks" / "results" / "ghost.md").read_text().strip()
    assert result in rendered_benchmarks_page()


def test_docs_show_every_committed_result_file():
    page = rendered_benchmarks_page()
    for path in (ROOT / "benchmarks" / "results").glob("*.md"):
        assert path.read_text().strip() in page, path.name


def test_ghost_result_file_says_how_it_was_made():
    text = (ROOT / "benchmarks" / "results" / "ghost.md").read_text()
    assert re.search(r"`python benchmarks/run.py ghost` on \d{4}-\d{2}-\d{2}, torch \S+", text)
    assert re.search(r"\d+ pairs per cell", text)
    rows = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(rows) == 12  # 3 shapes x NBS 2, 4, 32, full


def test_the_readme_quotes_rows_of_the_committed_model_benchmark():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- model-benchmark:[^>]*-->\n(.*?)<!-- /model-benchmark -->", readme,
                      flags=re.S)
    assert block, "the README quotes no model benchmark"
    rows = (ROOT / "benchmarks" / "results" / "model.md").read_text().splitlines()
    quoted = block.group(1).strip().splitlines()
    assert len(quoted) >= 6
    for line in quoted:
        assert line in rows, line


def _run_module():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmarks_page_types_in_no_table():
    """Every table on the Benchmarks page comes from a committed result file (the hook inserts
    them at the marker); the page's own text has none."""
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert not [line for line in page.splitlines() if line.lstrip().startswith("|")]


def test_run_save_writes_what_a_benchmark_printed_under_its_command(tmp_path, monkeypatch):
    run = _run_module()
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    path = run._save("fold", ["--x"], "\n| a | b |\n|---|---|\n| 1 | 2 |\n\n")
    text = path.read_text()
    assert path == tmp_path / "fold.md"
    assert re.match(r"`python benchmarks/run.py fold --x` on \d{4}-\d{2}-\d{2}, torch \S+, "
                    r"CPU\.\n\n\| a \| b \|\n", text)
    assert text.endswith("| 1 | 2 |\n")


def test_run_save_refuses_the_benchmarks_that_write_their_own_files():
    run = _run_module()
    for argv in (["ghost", "--save"], ["--save"], ["model", "fold", "--save"]):
        with pytest.raises(SystemExit, match="--save"):
            run.main(argv)


def test_every_number_of_the_readme_floors_is_in_a_committed_model_result():
    """The README's floor sentences quote the model benchmark's files (their table, their floor
    text), never typed-in numbers."""
    readme = (ROOT / "README.md").read_text()
    floors = readme.split("<!-- /model-benchmark -->", 1)[1].split("\n## ", 1)[0]
    assert "Floors" in floors
    results = "".join((ROOT / "benchmarks" / "results" / name).read_text()
                      for name in ("model.md", "model_compile.md"))
    numbers = re.findall(r"\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?%?", floors.replace("ResNet-18", ""))
    assert len(numbers) >= 6
    for number in numbers:
        parts = re.split(r"-(?=\d)", number.rstrip("%"))
        for part in parts:
            assert part in results, f"README floor number {number} is in no model result file"
