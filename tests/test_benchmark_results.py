"""The README's benchmark tables are the committed artifacts that the benchmarks wrote."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quoted(marker: str) -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {marker} -->\n(.*?)<!-- /{marker} -->", readme, flags=re.S)
    assert found, f"README.md has no <!-- {marker} --> block"
    return found.group(1).strip()


def test_readme_ghost_table_is_the_committed_result_file():
    result = (ROOT / "benchmarks" / "results" / "ghost.md").read_text().strip()
    assert quoted("ghost-results") == result


def test_ghost_result_file_says_how_it_was_made():
    text = (ROOT / "benchmarks" / "results" / "ghost.md").read_text()
    assert re.search(r"`python benchmarks/run.py ghost` on \d{4}-\d{2}-\d{2}, torch \S+", text)
    assert re.search(r"\d+ pairs per cell", text)
    rows = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(rows) == 12  # 3 shapes x NBS 2, 4, 32, full
