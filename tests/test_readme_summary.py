"""The README's reproduction summaries are generated from the committed quick and full runs, never
typed in."""

import json
from pathlib import Path

import pytest

from rethinkbn_studies import readme

ROOT = Path(__file__).resolve().parents[1]


def test_readme_summaries_equal_what_the_script_renders_from_the_committed_results():
    text = (ROOT / "README.md").read_text()
    assert readme.rewrite_all(text, ROOT) == text, (
        "README.md's summary blocks are stale: run python -m rethinkbn_studies.readme")


def test_both_committed_runs_have_a_block_and_a_report():
    text = (ROOT / "README.md").read_text()
    for source, (begin, end) in readme.BLOCKS.items():
        assert begin in text and end in text
        assert (ROOT / source).with_name("report.md").is_file()
        mode = json.loads((ROOT / source).read_text())["environment"]["mode"]
        assert mode == source.parent.name  # quick/ holds a quick run, full/ a full one


def _results(verdicts):
    return {"environment": {"mode": "quick", "seeds": [0, 1, 2], "jobs": 2, "wall_time_s": 61.0},
            "studies": {"nbs": {"error": None, "summary": [
                {"claim": f"c{i}", "ours": "1 | 2", "paper": "p", "verdict": v, "effect": 1.5,
                 "uncertainty": {"low": 0.5, "high": 2.5, "confidence": 0.95}}
                for i, v in enumerate(verdicts)]}}}


def test_render_counts_outcomes_and_shows_effect_and_interval():
    block = readme.render(_results(["agrees", "inconclusive", "disagrees", "agrees"]))
    assert "2 of 4 claims agree, 1 are inconclusive, 1 disagree" in block
    assert "| `nbs` | c0 | 1 \\| 2 | p | +1.50 [+0.50, +2.50] (95%) | **agrees** |" in block
    assert block.startswith(readme.BEGIN) and block.endswith(readme.END)


def test_the_head_says_when_and_how_the_run_was_made():
    results = _results(["agrees"])
    results["environment"].update(started="2026-12-01T10:00:00+00:00", commit="abc1234",
                                  command="rethinkbn reproduce --quick --jobs 2")
    block = readme.render(results)
    assert ("(run 2026-12-01T10:00:00+00:00, commit abc1234, `rethinkbn reproduce --quick "
            "--jobs 2`; mode quick" in block)


def test_a_range_without_a_confidence_level_is_shown_without_a_percentage():
    results = _results(["agrees"])
    results["studies"]["nbs"]["summary"][0]["uncertainty"]["confidence"] = None
    assert "| +1.50 [+0.50, +2.50] | **agrees** |" in readme.render(results)


def test_rewrite_replaces_only_the_block_and_needs_both_markers():
    text = f"before\n{readme.BEGIN}\nold\n{readme.END}\nafter\n"
    assert readme.rewrite(text, "NEW") == "before\nNEW\nafter\n"
    with pytest.raises(ValueError, match="markers"):
        readme.rewrite("no markers", "NEW")


@pytest.mark.parametrize("source", list(readme.BLOCKS))
def test_every_committed_verdict_states_effect_uncertainty_test_and_one_of_four_outcomes(source):
    """agrees / inconclusive / disagrees with effect, interval and test; or (issue 20) not
    testable, with the unmet precondition stated."""
    results = json.loads((ROOT / source).read_text())
    env = results["environment"]
    assert len(env["seeds"]) >= 3 and env.get("command") and env.get("started")
    folder = (ROOT / source).parent
    for name, study in results["studies"].items():
        assert study["error"] is None, name
        assert all((folder / plot).is_file() for plot in study["plots"]), name
        for row in study["summary"]:
            assert row["verdict"] in ("agrees", "disagrees", "inconclusive", "not testable"), \
                row["claim"]
            if row["verdict"] == "not testable":
                assert row["precondition"], row["claim"]
                continue
            assert row["effect"] is not None and row["test"], row["claim"]
            u = row["uncertainty"]
            assert u["low"] is not None and u["low"] <= row["effect"] <= u["high"], row["claim"]


def test_the_committed_quick_run_shows_fig4_and_the_lambda_sweep_with_plots_and_verdicts():
    results = json.loads((ROOT / readme.RESULTS).read_text())
    assert results["environment"]["mode"] == "quick"
    report = (ROOT / readme.RESULTS).with_name("report.md").read_text()
    for plot in ("precise_samples.png", "ema_momentum_sweep.png"):
        assert f"![{plot}]({plot})" in report
    claims = [r["claim"] for r in results["studies"]["ema-vs-precise"]["summary"]]
    assert any(c.startswith("Fig. 4") for c in claims)
    assert any(c.startswith("Lambda sweep") for c in claims)


def test_the_readme_block_is_a_headline_the_disagreements_and_a_link():
    results = _results(["agrees", "disagrees", "inconclusive"])
    results["studies"]["nbs"]["summary"][1]["claim"] = "Sec. 4.3: mu_B beats pop"
    block = readme.headline_block(results, "docs/results/quick/results.json")
    head = readme.render(results, "docs/results/quick/results.json").splitlines()[1]
    assert block.splitlines()[1] == head  # the same counts as the docs' table
    assert "- `nbs`: Sec. 4.3: mu_B beats pop (1 | 2; paper: p)" in block
    assert "[the report](docs/results/quick/report.md)" in block
    assert "| study |" not in block and "c0" not in block  # no per-claim table
    assert "No claim disagrees." in readme.headline_block(_results(["agrees"]))


def test_an_ablation_of_ours_that_disagrees_is_marked_as_ours():
    results = _results(["disagrees"])
    results["studies"]["nbs"]["summary"][0]["paper_claim"] = False
    assert "- `nbs`: c0 (ours) (" in readme.headline_block(results)


@pytest.mark.parametrize("source", list(readme.BLOCKS))
def test_the_full_tables_are_on_the_docs_page_not_in_the_readme(source):
    """Issue 22: the README shows the headline; every claim's row is on docs/reproduction.md,
    whose markers the docs build expands with :func:`readme.render`."""
    text = (ROOT / "README.md").read_text()
    results = json.loads((ROOT / source).read_text())
    table = readme.render(results, str(source))
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert rows and not any(row in text for row in rows)
    page = (ROOT / "docs/reproduction.md").read_text()
    assert f"<!-- reproduce-summary:{source.parent.name} -->" in page
    assert len(text.splitlines()) <= 150
