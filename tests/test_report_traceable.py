"""Issue 20, item 7: every number of a study's summary row appears in its section of the report
(a table or a sentence), so that a reader can trace it."""

import json
from pathlib import Path

import pytest

from rethinkbn_studies.contract.report import section, untraced_numbers

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "docs/results/quick"


def untraced(folder: Path) -> dict[str, list[tuple[str, list[str]]]]:
    """Per study of ``folder``'s results.json, the summary cells with numbers its section of
    report.md does not show."""
    results = json.loads((folder / "results.json").read_text())
    report = (folder / "report.md").read_text()
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for name, study in results["studies"].items():
        text = section(report, name)
        for row in study.get("summary", []):
            missing = untraced_numbers(row["ours"], text)
            if missing:
                out.setdefault(name, []).append((row["ours"], missing))
    return out


def test_untraced_numbers_finds_each_number_or_its_rounding():
    text = "| 128 | 0.0 | 17.2 | +17.7 pt | 79.90 | 15.25 |"
    assert untraced_numbers("+17.7 at NBS=128 vs 17.2", text) == []
    assert untraced_numbers("79.9 vs 0", text) == []
    assert untraced_numbers("15.3 vs 52.6 (GroupNorm)", text) == ["15.3", "52.6"]
    assert untraced_numbers("7", "17.2") == ["7"]  # a whole token, not a substring


def test_section_is_one_studys_text():
    report = "# t\n\n## `a`: x\n\n1.5\n\n## `b`: y\n\n2.5\n\n## Environment\n"
    assert "1.5" in section(report, "a") and "2.5" not in section(report, "a")
    assert "2.5" in section(report, "b") and "Environment" not in section(report, "b")
    with pytest.raises(KeyError, match="'c'"):
        section(report, "c")


def test_a_tiny_run_traces_every_summary_number(tmp_path, tiny_data, data_file, one_thread):
    import shutil

    from rethinkbn.cli import main

    (tmp_path / "cache").mkdir()
    shutil.copy(data_file, tmp_path / "cache")
    assert main(["reproduce", "--tiny", "--data", tiny_data, "--out", str(tmp_path),
                 "--jobs", "1"]) == 0
    assert untraced(tmp_path) == {}


@pytest.mark.parametrize("name", json.loads((QUICK / "results.json").read_text())["studies"])
def test_the_committed_quick_report_traces_every_summary_number(name):
    assert name not in untraced(QUICK)
