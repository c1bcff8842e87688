"""The harness: run cache, resuming after an interrupt, report and results.json."""

import json

import pytest
import torch

from rethinkbn_studies.contract.base import Study, StudyResult, SummaryRow, Table, Verdict, verdict
from rethinkbn_studies.contract.report import StudyOutcome, write_outputs
from rethinkbn_studies.infra.cache import RunCache, config_key
from rethinkbn_studies.infra.harness import reproduce


def test_cache_runs_once_per_config(tmp_path):
    cache = RunCache(tmp_path)
    calls = []
    run = lambda: calls.append(1) or {"err": 1.5}
    assert cache.get_or_run({"seed": 0}, run) == {"err": 1.5}
    assert cache.get_or_run({"seed": 0}, run) == {"err": 1.5}
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    assert not list(tmp_path.glob("*.tmp*"))


def test_cache_key_depends_on_every_config_value_not_its_order():
    assert config_key({"a": 1, "seed": 0}) == config_key({"seed": 0, "a": 1})
    assert config_key({"a": 1, "seed": 0}) != config_key({"a": 1, "seed": 1})


def test_cache_rejects_a_config_that_is_not_json():
    with pytest.raises(TypeError, match="JSON"):
        config_key({"model": torch.nn.Linear(1, 1)})


def test_a_failed_run_stores_nothing(tmp_path):
    cache = RunCache(tmp_path)

    def boom():
        raise RuntimeError("diverged")

    with pytest.raises(RuntimeError):
        cache.get_or_run({"seed": 0}, boom)
    assert not list(tmp_path.iterdir())



def test_a_result_that_cannot_be_saved_leaves_no_partial_file(tmp_path):
    cache = RunCache(tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - pickling's own error type varies
        cache.get_or_run({"seed": 0}, lambda: {"fn": lambda: None})
    assert not list(tmp_path.iterdir())

def test_interrupted_reproduction_resumes_from_the_cache(tiny_out, tiny_data, quiet, one_thread):
    cache_dir = tiny_out / "cache"
    bars = []

    def interrupt_second_run(iterable=None, desc=None, **kwargs):
        if desc.startswith("NBS"):  # a training run's epoch bar
            bars.append(desc)
        if len(bars) == 2:  # the second training run starts: the first one has finished
            raise KeyboardInterrupt
        return iterable

    with pytest.raises(KeyboardInterrupt):
        reproduce(["precise-batch"], tiny=True, data=tiny_data, out_dir=tiny_out,
                  progress=interrupt_second_run)
    assert len(list(cache_dir.glob("*.pt"))) == 1

    _, outcomes = reproduce(["precise-batch"], tiny=True, data=tiny_data, out_dir=tiny_out,
                            progress=quiet)
    env = json.loads((tiny_out / "results.json").read_text())["environment"]
    assert outcomes[0].error is None
    # Hits: the run finished before the interrupt, and that same model again as the chosen
    # row of the difficulty calibration; everything else ran once.
    assert env["cache"]["hits"] == 2
    assert env["cache"]["misses"] == len(list(cache_dir.glob("*.pt"))) - 1


def _result(agrees: bool) -> StudyResult:
    return StudyResult(
        setup="A tiny setup.",
        tables=[Table("ours", ["a", "b"], [[1, (2.0, 0.5)]])],
        paper_tables=[Table("paper", ["a", "b"], [[1, 2.5]])],
        plots=["plot.png"],
        summary=[SummaryRow("claim X", "2.0", "2.5", verdict("x >= 1", agrees, "x = 2"))],
        numbers={"x": 2.0, "curve": [1.0, float("nan")]},
    )


def test_report_has_summary_and_one_section_per_study(tmp_path):
    study = Study("demo", "a demo study", lambda ctx: _result(True))
    broken = Study("broken", "a failing study", lambda ctx: _result(True))
    outcomes = [StudyOutcome(study, _result(True), 1.0),
                StudyOutcome(broken, None, 0.5, "RuntimeError: diverged")]
    env = {"versions": {"torch": torch.__version__}, "platform": "test", "device": "cpu",
           "torch_threads": 1, "seeds": [0], "mode": "quick", "data": "mnist1d"}
    report = write_outputs(tmp_path, outcomes, env, 1.5).read_text()
    assert "## Summary" in report and "## `demo`" in report and "## `broken`" in report
    assert "| `demo` | claim X | 2.0 | 2.5 | **agrees** |" in report
    assert "2.0 ± 0.5" in report and "![plot.png](plot.png)" in report
    assert "RuntimeError: diverged" in report
    assert "**agrees** — x >= 1 (x = 2)" in report


def test_results_json_holds_numbers_verdicts_and_environment(tmp_path):
    study = Study("demo", "a demo study", lambda ctx: _result(False))
    env = {"versions": {"torch": torch.__version__}, "platform": "test", "device": "cpu",
           "torch_threads": 1, "seeds": [0, 1, 2], "mode": "full", "data": "mnist1d"}
    write_outputs(tmp_path, [StudyOutcome(study, _result(False), 3.0)], env, 3.5)
    results = json.loads((tmp_path / "results.json").read_text())
    demo = results["studies"]["demo"]
    assert demo["numbers"] == {"x": 2.0, "curve": [1.0, None]}
    assert demo["summary"][0]["verdict"] == "disagrees"
    assert demo["summary"][0]["criterion"] == "x >= 1"
    assert results["environment"]["seeds"] == [0, 1, 2]
    assert results["environment"]["wall_time_s"] == 3.5


def test_a_pipe_in_a_summary_cell_does_not_split_the_row(tmp_path):
    result = _result(True)
    result.summary = [SummaryRow("claim |x| small", "|x| = 2", "-", verdict("|x| < 3", True))]
    env = {"versions": {}, "platform": "test", "device": "cpu", "torch_threads": 1,
           "seeds": [0], "mode": "quick", "data": "mnist1d"}
    outcome = StudyOutcome(Study("demo", "a demo study", lambda ctx: result), result, 1.0)
    report = write_outputs(tmp_path, [outcome], env, 1.0).read_text()
    assert r"| `demo` | claim \|x\| small | \|x\| = 2 | - | **agrees** |" in report


@pytest.mark.parametrize("damage", ["truncate", "empty", "junk"])
def test_an_unreadable_cache_entry_is_a_miss_moved_aside_with_a_warning(tmp_path, damage):
    cache = RunCache(tmp_path)
    cache.get_or_run({"seed": 0}, lambda: {"err": torch.arange(1000.0)})
    path = cache.path({"seed": 0})
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"",
                      "junk": b"not a torch file"}[damage])
    calls = []
    with pytest.warns(RuntimeWarning, match=rf"{path.name} cannot be read.*running it again"):
        result = RunCache(tmp_path).get_or_run({"seed": 0}, lambda: calls.append(1) or {"err": 2})
    assert result == {"err": 2} and calls == [1]
    assert (tmp_path / f"{path.name}.corrupt").exists()  # kept for a look
    assert RunCache(tmp_path).get({"seed": 0}) == {"err": 2}  # the rerun stored a good file


def test_a_truncated_cache_entry_does_not_fail_the_study_on_rerun(tiny_out, tiny_data, quiet,
                                                                   one_thread):
    reproduce(["precise-batch"], tiny=True, data=tiny_data, out_dir=tiny_out, progress=quiet)
    entries = sorted((tiny_out / "cache").glob("*.pt"))
    damaged = entries[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match=damaged.name):
        _, outcomes = reproduce(["precise-batch"], tiny=True, data=tiny_data, out_dir=tiny_out,
                                progress=quiet)
    env = json.loads((tiny_out / "results.json").read_text())["environment"]
    assert outcomes[0].error is None
    # One miss (the damaged file); every other entry is a hit, and the shared NBS=32 model is
    # asked for twice (the table and the difficulty calibration).
    assert env["cache"]["misses"] == 1 and env["cache"]["hits"] == len(entries)


def test_an_inconclusive_verdict_carries_effect_uncertainty_and_test_to_both_outputs(tmp_path):
    from rethinkbn_studies.contract.verdicts import Interval, exceeds

    result = _result(True)
    interval = Interval(0.4, -0.3, 1.1, 0.95, "paired bootstrap over 2000 validation samples")
    result.summary = [SummaryRow("claim Y", "0.4", "5.0", exceeds("gap > 0", interval))]
    env = {"versions": {}, "platform": "test", "device": "cpu", "torch_threads": 1,
           "seeds": [0], "mode": "quick", "data": "mnist1d"}
    outcome = StudyOutcome(Study("demo", "a demo study", lambda ctx: result), result, 1.0)
    report = write_outputs(tmp_path, [outcome], env, 1.0).read_text()
    assert "| `demo` | claim Y | 0.4 | 5.0 | **inconclusive** |" in report
    assert ("**inconclusive** — gap > 0 (+0.40 pt, 95% CI [-0.30, +1.10]; paired bootstrap "
            "over 2000 validation samples)") in report
    # issue 20: the headline counts the paper's claims apart and names all four outcomes
    assert ("of 1 paper claims, 0 agree, 1 are inconclusive, 0 disagree, 0 are not testable"
            in report)
    row = json.loads((tmp_path / "results.json").read_text())["studies"]["demo"]["summary"][0]
    assert row["verdict"] == "inconclusive" and row["effect"] == 0.4
    assert row["uncertainty"] == {"low": -0.3, "high": 1.1, "confidence": 0.95}
    assert row["test"].startswith("paired bootstrap")


def test_a_verdict_whose_outcome_contradicts_agrees_is_refused():
    with pytest.raises(ValueError, match="contradicts"):
        Verdict(agrees=True, criterion="x", outcome="inconclusive")


def _pid_and_square(ctx, x):
    """A task for run_all: where it ran, and a result (module level: worker processes import
    it)."""
    import os

    return os.getpid(), x * x


def _context(tmp_path, jobs, pool):
    from pathlib import Path

    from rethinkbn_studies.contract.base import RunContext
    from rethinkbn_studies.infra.harness import DatasetLoader

    return RunContext(quick=True, seeds=(0,), out_dir=Path(tmp_path), device=torch.device("cpu"),
                      cache=RunCache(tmp_path / "cache"), progress=lambda it=None, **k: it,
                      dataset=DatasetLoader("mnist1d:1000", None), jobs=jobs, pool=pool)


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_all_runs_each_distinct_config_once_and_caches_it(tmp_path, jobs):
    import os

    from rethinkbn_studies.contract.base import Task
    from rethinkbn_studies.infra.tasks import process_pool

    tasks = [Task({"x": x}, _pid_and_square, (x,)) for x in (2, 3, 2)]
    with process_pool(jobs) as pool:
        ctx = _context(tmp_path, jobs, pool)
        results = ctx.run_all(tasks)
        assert [r[1] for r in results] == [4, 9, 4]
        assert results[0] == results[2]  # one run for the two tasks of one config
        assert (ctx.cache.misses, ctx.cache.hits) == (2, 0)
        # jobs > 1: the runs happened in worker processes; 1: here.
        assert all((pid != os.getpid()) == (jobs > 1) for pid, _ in results)
        assert ctx.run_all(tasks) == results and ctx.cache.hits == 2


def test_the_command_line_of_a_run_gives_its_settings_back():
    from rethinkbn_studies.infra.harness import reproduce_command

    assert reproduce_command(None, quick=True, seeds=None, device="cpu", data="mnist1d",
                             ranks=1, threads=1, jobs=2) == "rethinkbn reproduce --quick --jobs 2"
    assert reproduce_command(["nbs", "leakage"], quick=False, seeds=5, device="cuda",
                             data="mnist1d:4000", ranks=2, threads=4, jobs=1) == (
        "rethinkbn reproduce --only nbs,leakage --seeds 5 --device cuda --data mnist1d:4000 "
        "--ranks 2 --threads 4 --jobs 1")


def test_a_real_run_records_its_date_command_and_commit(tmp_path):
    from rethinkbn_studies.contract import base

    base.register_study("dated-demo", "a demo study")(lambda ctx: _result(True))
    try:
        reproduce(["dated-demo"], quick=True, out_dir=tmp_path, tiny=True)
    finally:
        base._REGISTRY.pop("dated-demo")
    env = json.loads((tmp_path / "results.json").read_text())["environment"]
    # the command that makes the same run again (`rethinkbn variation` reruns it): --tiny too
    assert env["command"] == "rethinkbn reproduce --tiny --quick --only dated-demo --jobs 1"
    assert env["started"].startswith(("20", "21"))  # an ISO date
    report = (tmp_path / "report.md").read_text()
    assert f"Run {env['started']}" in report and f"`{env['command']}`" in report


class _Bar:
    """A progress bar that records what it was given (tqdm's interface, nothing drawn)."""

    def __init__(self, log, desc, total):
        self.log, self.desc, self.total, self.count = log, desc, total, 0
        log.append(self)

    def update(self, n):
        self.count += n

    def close(self):
        pass


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_all_counts_the_runs_it_computes_on_one_bar(tmp_path, jobs):
    import dataclasses

    from rethinkbn_studies.contract.base import Task
    from rethinkbn_studies.infra.tasks import process_pool

    bars = []
    tasks = [Task({"x": x}, _pid_and_square, (x,)) for x in (2, 3, 2)]
    with process_pool(jobs) as pool:
        ctx = dataclasses.replace(
            _context(tmp_path, jobs, pool),
            progress=lambda it=None, *, desc=None, total=None, leave=False: _Bar(bars, desc,
                                                                                 total))
        ctx.run_all(tasks[:1], desc="first")
        ctx.run_all(tasks, desc="second")
        ctx.run_all(tasks, desc="cached")  # nothing to compute: no bar
    # One bar per call that computes something, over the distinct configs not yet cached.
    assert [(b.desc, b.total, b.count) for b in bars] == [("first", 1, 1), ("second", 1, 1)]
