"""`rethinkbn reproduce`'s progress when its output goes to a file or pipe (as under pytest):
"study k of N" start and end lines with the elapsed time and an ETA, per-study lines of runs done
over the total, and a last line with the report path and the verdict counts."""

import re

import pytest

from rethinkbn.cli import main
from rethinkbn_studies.contract import base
from rethinkbn_studies.contract.base import StudyResult, SummaryRow, Table, Task, verdict
from rethinkbn_studies.contract.report import StudyOutcome
from rethinkbn_studies.infra.harness import LineProgress, verdict_counts


def _square(ctx, x):
    return x * x


def _result(agrees):
    return StudyResult(setup="tiny", tables=[Table("ours", ["a"], [[1]])], paper_tables=[],
                       plots=[], summary=[SummaryRow("claim", "1", "1",
                                                     verdict("x >= 1", agrees, "x = 1"))],
                       numbers={})


@pytest.fixture
def demo_studies():
    def runs(ctx):
        assert ctx.run_all([Task({"demo": x}, _square, (x,)) for x in range(3)],
                           desc="demo-runs") == [0, 1, 4]
        return _result(True)

    def broken(ctx):
        raise RuntimeError("demo failure")

    base.register_study("demo-runs", "runs three tasks")(runs)
    base.register_study("demo-broken", "fails")(broken)
    yield
    base._REGISTRY.pop("demo-runs")
    base._REGISTRY.pop("demo-broken")


def test_a_logged_run_says_study_k_of_n_runs_done_eta_and_the_verdicts(tmp_path, capsys,
                                                                     demo_studies):
    assert main(["reproduce", "--tiny", "--only", "demo-runs,demo-broken",
                 "--out", str(tmp_path), "--jobs", "1"]) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert "[rethinkbn] study 1 of 2, demo-runs: runs three tasks" in err
    assert re.search(r"\[rethinkbn\] demo-runs: 3/3 runs done, \d+ s", err), err
    assert re.search(r"study 1 of 2, demo-runs, done in \d+ s \(elapsed \d+ s; about \d+ s "
                     r"left\)", err), err
    assert re.search(r"study 2 of 2, demo-broken, failed in \d+ s \(elapsed \d+ s\)", err), err
    assert captured.out.strip() == (f"report: {tmp_path / 'report.md'} (verdicts: 1 "
                                    f"{_result(True).summary[0].verdict.label}; 1 study failed)")


def test_line_progress_prints_each_tenth_and_the_last(tmp_path):
    import io

    log = io.StringIO()
    bar = LineProgress("sweep", 25, log)
    for _ in range(25):
        bar.update(1)
    bar.close()
    done = [int(m) for m in re.findall(r"sweep: (\d+)/25 runs done", log.getvalue())]
    assert done == list(range(2, 25, 2)) + [25]


def test_verdict_counts_group_labels_and_count_failures():
    study = base.Study("s", "d", lambda ctx: None)
    ok, no = _result(True), _result(False)
    outcomes = [StudyOutcome(study, ok, 1.0), StudyOutcome(study, ok, 1.0),
                StudyOutcome(study, no, 1.0), StudyOutcome(study, None, 1.0, "boom")]
    yes_label, no_label = ok.summary[0].verdict.label, no.summary[0].verdict.label
    assert verdict_counts(outcomes) == f"2 {yes_label}, 1 {no_label}; 1 study failed"
    assert verdict_counts([]) == "no verdicts"
