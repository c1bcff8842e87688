"""The wall times the README and the docs quote are those of docs/results/timings.json."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = json.loads((ROOT / "docs/results/timings.json").read_text())



def test_the_readme_quotes_the_measured_quick_run():
    quick = TIMINGS["quick"]
    readme = " ".join((ROOT / "README.md").read_text().split())  # line breaks as spaces
    run = f"{quick['run_s'] // 60} min {quick['run_s'] % 60} s"
    assert (f"from a clean clone on 2 quiet CPU cores ({quick['date']}, commit "
            f"{quick['commit']}) the install took {quick['install_s']} s and the run {run}"
            ) in readme
    assert quick["run_s"] <= 600  # the budget the README's first command promises


def test_the_readme_quotes_the_measured_full_run():
    full = TIMINGS["full"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    wall_min = round(max(full["wall_s"]) / 60)
    cpu = sum(full["cpu_s"])
    assert f"{wall_min} min wall time and {cpu:,} CPU-seconds" in readme
    assert f"commit {full['commit']}" in readme
