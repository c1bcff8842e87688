"""Between-machine variation: compare verdicts across CPU builds, and show it in the report."""

import json
import subprocess
import sys

import pytest
import torch

from rethinkbn.cli import main
from rethinkbn_studies.contract import variation
from rethinkbn_studies.contract.base import Study, StudyResult, SummaryRow, verdict
from rethinkbn_studies.contract.report import StudyOutcome, write_outputs
from rethinkbn_studies.infra.harness import reproduce
from rethinkbn_studies.infra.variation import build_capability, run_variation

ENV = {"versions": {"torch": torch.__version__}, "platform": "test", "device": "cpu",
       "torch_threads": 1, "seeds": [0], "mode": "quick", "data": "mnist1d",
       "command": "rethinkbn reproduce --quick --jobs 1", "started": "2026-12-07T00:00:00"}


def _results(verdicts: dict[str, tuple[str, float | None]]) -> dict:
    """A results.json with one study whose claims have these (verdict, effect)."""
    return {"environment": ENV, "studies": {"demo": {"summary": [
        {"claim": claim, "verdict": label, "effect": effect, "paper_claim": claim != "own",
         "uncertainty": {"low": None if effect is None else effect - 1,
                         "high": None if effect is None else effect + 1}}
        for claim, (label, effect) in verdicts.items()]}}}


def test_compare_marks_a_claim_robust_only_when_every_build_repeats_its_verdict():
    reference = _results({"a": ("agrees", 3.0), "b": ("inconclusive", 0.5), "own": ("agrees", 2)})
    builds = {"avx2": _results({"a": ("agrees", 2.5), "b": ("agrees", 1.4),
                                "own": ("agrees", 2.0)}),
              "sse": _results({"a": ("agrees", 3.5), "b": ("inconclusive", 0.1)})}
    claims = {c["claim"]: c for c in variation.compare(reference, builds)}
    assert claims["a"]["robust"] and claims["a"]["effect_spread"] == pytest.approx(1.0)
    assert not claims["b"]["robust"]  # avx2 gives agrees
    assert claims["b"]["builds"]["avx2"] == {"verdict": "agrees", "effect": 1.4,
                                             "interval": [pytest.approx(0.4), 2.4]}
    # a claim a build lacks is not robust, and its spread is unknown
    assert claims["own"]["builds"]["sse"] is None and not claims["own"]["robust"]
    assert claims["own"]["effect_spread"] is None
    assert variation.robust_counts(list(claims.values())) == "1 of 1 agrees, 0 of 1 inconclusive"


def test_marks_name_the_builds_that_differ_and_refuse_another_runs_variation():
    reference = _results({"a": ("agrees", 3.0), "b": ("inconclusive", 0.5)})
    builds = {"avx2": _results({"a": ("agrees", 2.5), "b": ("agrees", 1.4)})}
    measured = {"claims": variation.compare(reference, builds)}
    verdicts = {("demo", "a"): "agrees", ("demo", "b"): "inconclusive"}
    assert variation.marks(measured, verdicts) == {("demo", "a"): "same",
                                                   ("demo", "b"): "avx2: agrees"}
    # another run: a verdict differs, or a claim is new: its builds say nothing about these
    assert variation.marks(measured, {**verdicts, ("demo", "b"): "agrees"}) is None
    assert variation.marks(measured, {**verdicts, ("demo", "c"): "agrees"}) is None
    assert variation.marks(None, verdicts) is None


def test_a_variation_file_that_is_not_json_is_named_and_runs_no_code(tmp_path):
    assert variation.load(tmp_path) is None
    (tmp_path / "variation.json").write_bytes(b"\x80\x04K\x01.")  # a pickle, not JSON
    with pytest.raises(ValueError, match=r"variation\.json: not a valid variation file"):
        variation.load(tmp_path)
    (tmp_path / "variation.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="no list of claims"):
        variation.load(tmp_path)


def _outcome(label_b: bool) -> StudyOutcome:
    result = StudyResult(setup="A tiny setup.", tables=[], paper_tables=[], plots=[], summary=[
        SummaryRow("a", "2.0", "2.5", verdict("x >= 1", True, "x = 2")),
        SummaryRow("b", "0.1", "2.5", verdict("y >= 1", label_b, "y = 0"))], numbers={})
    return StudyOutcome(Study("demo", "a demo study", lambda ctx: result), result, 1.0)


def _variation_file(tmp_path, b_on_avx2: str) -> None:
    reference = _results({"a": ("agrees", 3.0), "b": ("disagrees", -0.5)})
    builds = {"avx2": _results({"a": ("agrees", 2.5), "b": (b_on_avx2, 0.4)})}
    (tmp_path / "variation.json").write_text(json.dumps({
        "date": "2026-12-07", "command": "rethinkbn variation --reference x --builds avx2",
        "reference": {"commit": "abc1234", "started": "2026-12-07T00:00:00"},
        "builds": {"avx2": {"description": "AVX2 kernels", "env": {"ATEN_CPU_CAPABILITY": "avx2"},
                            "wall_time_s": 12.0}},
        "claims": variation.compare(reference, builds)}))


def test_the_report_shows_each_verdicts_fate_on_the_other_builds(tmp_path):
    _variation_file(tmp_path, "inconclusive")
    report = write_outputs(tmp_path, [_outcome(False)], ENV, 1.0).read_text()
    assert "| study | claim | ours | paper | verdict | other builds |" in report
    assert "| `demo` | a | 2.0 | 2.5 | **agrees** | same |" in report
    assert "| `demo` | b | 0.1 | 2.5 | **disagrees** | avx2: inconclusive |" in report
    assert "## Between-machine variation" in report
    assert "1 of 1 agrees, 0 of 1 disagrees" in report  # the head line's counts too
    rows = json.loads((tmp_path / "results.json").read_text())["studies"]["demo"]["summary"]
    assert [r["other_builds"] for r in rows] == ["same", "avx2: inconclusive"]


def test_a_variation_of_another_run_is_named_not_shown_as_this_runs(tmp_path):
    _variation_file(tmp_path, "disagrees")
    report = write_outputs(tmp_path, [_outcome(True)], ENV, 1.0).read_text()  # b agrees now
    assert "other builds" not in report
    assert "was measured on another run (commit abc1234" in report
    rows = json.loads((tmp_path / "results.json").read_text())["studies"]["demo"]["summary"]
    assert all("other_builds" not in r for r in rows)


def test_the_builds_change_the_kernels_torch_picks():
    # Without this, a "build" would rerun the same kernels and find no variation at all.
    here = build_capability(variation.Build("here", "", {}))
    assert build_capability(variation.BUILDS["sse"]) == "DEFAULT"
    if here == "AVX512":
        assert build_capability(variation.BUILDS["avx2"]) == "AVX2"


def test_run_variation_reruns_the_recorded_command_on_a_build(tiny_out, tiny_data, quiet,
                                                              one_thread, tmp_path):
    reproduce(["precise-batch"], tiny=True, data=tiny_data, out_dir=tiny_out, progress=quiet)
    reference = json.loads((tiny_out / "results.json").read_text())
    assert "--tiny" in reference["environment"]["command"]
    work = tmp_path / "builds"
    (work / "sse" / "cache").mkdir(parents=True)  # the tiny data, not regenerated
    for f in (tiny_out / "cache").glob("*.npz"):
        (work / "sse" / "cache" / f.name).write_bytes(f.read_bytes())
    path = run_variation(tiny_out, work, ["sse"], timeout_s=600, log=sys.stderr)
    measured = json.loads(path.read_text())
    assert measured["builds"]["sse"]["capability"] == "DEFAULT"
    assert [c["claim"] for c in measured["claims"]] == [
        r["claim"] for r in reference["studies"]["precise-batch"]["summary"]]
    # rerun into the reference folder (from its cache): the report carries the variation
    reproduce(["precise-batch"], tiny=True, data=tiny_data, out_dir=tiny_out, progress=quiet)
    assert "## Between-machine variation" in (tiny_out / "report.md").read_text()


def test_variation_command_refuses_an_unknown_build_before_any_work(tmp_path, capsys):
    assert main(["variation", "--reference", str(tmp_path), "--builds", "arm64"]) == 2
    assert "unknown build(s) ['arm64']" in capsys.readouterr().err


def test_variation_command_is_registered():
    done = subprocess.run([sys.executable, "-m", "rethinkbn.cli", "variation", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--builds" in done.stdout


def test_the_readme_head_line_counts_the_verdicts_every_build_repeats():
    from rethinkbn_studies import readme

    results = _results({"a": ("agrees", 3.0), "b": ("agrees", 1.0), "own": ("agrees", 2.0)})
    results["environment"] = {**ENV, "jobs": 2, "wall_time_s": 280.0}
    block = readme.headline_block(results)
    assert "every other CPU build" not in block  # no variation measured: nothing said
    rows = results["studies"]["demo"]["summary"]
    for row, fate in zip(rows, ["same", "sse: inconclusive", "same"], strict=True):
        row["other_builds"] = fate
    assert ("Paper claims whose verdict every other CPU build repeats (the report's "
            "*Between-machine variation*): 1 of 2 agrees.") in readme.headline_block(results)
