"""The command line: `rethinkbn studies` and `rethinkbn reproduce` end to end (tiny scale)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from rethinkbn.cli import build_parser, main
from rethinkbn_studies.contract.base import RunContext, Study
from rethinkbn_studies.infra import harness
from rethinkbn_studies.infra.cache import RunCache

PART1 = ["ema-vs-precise", "precise-batch", "nbs"]


def test_studies_lists_every_study_on_one_line(capsys):
    assert main(["studies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names[:3] == PART1
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)


def test_unknown_study_is_a_clear_error(tmp_path, capsys):
    assert main(["reproduce", "--only", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "ema-vs-precise" in err


def test_reproduce_writes_report_plots_and_results(tiny_out, tiny_data, capsys):
    code = main(["reproduce", "--tiny", "--data", tiny_data, "--only", ",".join(PART1),
                 "--out", str(tiny_out), "--jobs", "2"])
    assert code == 0
    out = tiny_out
    report = (out / "report.md").read_text()
    assert report.index("## Summary") < report.index("## `ema-vs-precise`")
    for name in PART1:
        assert f"## `{name}`" in report
        assert report.count(f"| `{name}` |") >= 3  # its rows in the summary table
    assert report.count("**Verdicts.**") == 3
    # precise-batch's deep augmented network: its Table 2 row, ablation rows, verdicts (the
    # paper's two and the mechanism's), the pilots and the mechanism sentence
    assert report.count("| Deep augmented network (NBS=32, 3 blocks per stage, per-step "
                        "augmentation)") == 3
    assert report.count("| NBS=32, 3 blocks, augmented |") == 4
    assert "pilots that chose the deep augmented network" in report
    assert "the deep augmented NBS=32 model (3 blocks per stage) changes by" in report
    for plot in ["ema_vs_precise.png", "ema_batch_means.png", "precise_samples.png", "nbs.png"]:
        assert (out / plot).stat().st_size > 1000
        assert f"]({plot})" in report
    results = json.loads((out / "results.json").read_text())
    assert set(results["studies"]) == set(PART1)
    assert results["environment"]["versions"]["torch"]
    assert all(s["error"] is None for s in results["studies"].values())
    # Every verdict of these studies knows its noise: outcome, effect, interval and test.
    for study in results["studies"].values():
        for row in study["summary"]:
            assert row["verdict"] in ("agrees", "disagrees", "inconclusive", "not testable")
            if row["verdict"] == "not testable":  # issue 20: its unmet precondition, stated
                assert row["precondition"]
                continue
            u = row["uncertainty"]
            assert u["low"] <= row["effect"] <= u["high"] and row["test"] and row["rule"]
    assert report.count("**What would change the verdicts**") == 3
    # The NBS models of precise-batch are the nbs study's: trained once, in 2 worker processes.
    env = results["environment"]
    assert env["jobs"] == 2 and env["cache"]["hits"] >= 2


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["reproduce", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--seeds", "--threads", "--ranks", "--jobs"])
@pytest.mark.parametrize("value", ["many", "0"])
def test_reproduce_rejects_a_count_that_is_not_positive(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", flag, value, "--out", str(tmp_path)])
    assert flag in capsys.readouterr().err


def test_ranks_defaults_to_virtual_devices_only():
    assert build_parser().parse_args(["reproduce"]).ranks == 1


def test_ranks_flag_reaches_the_studies_context(tiny_out, tiny_data, monkeypatch):
    seen = []

    def record(ctx):  # stands in for a study: only the context it receives matters here
        seen.append(ctx.ranks)
        raise RuntimeError("stop after reading the context")

    monkeypatch.setattr(harness, "get_study",
                        lambda name: Study(name, "records", record, uses_ranks=True))
    code = main(["reproduce", "--tiny", "--data", tiny_data, "--only", "leakage", "--ranks",
                 "2", "--out", str(tiny_out)])
    assert seen == [2] and code == 1
    env = json.loads((tiny_out / "results.json").read_text())["environment"]
    assert env["ranks"] == 2



def test_threads_flag_holds_while_the_studies_run_and_is_restored(tiny_out, tiny_data,
                                                                   monkeypatch):
    seen = []

    def record(ctx):  # stands in for a study: only the thread setting it runs under matters
        seen.append(torch.get_num_threads())
        raise RuntimeError("stop after reading the thread setting")

    monkeypatch.setattr(harness, "get_study", lambda name: Study(name, "records", record))
    before = torch.get_num_threads()
    wanted = 3 if before != 3 else 2
    code = main(["reproduce", "--tiny", "--data", tiny_data, "--only", "leakage", "--threads",
                 str(wanted), "--out", str(tiny_out)])
    assert seen == [wanted] and code == 1
    assert torch.get_num_threads() == before

@pytest.mark.parametrize("ranks", [0, -1, 1.5, True])
def test_context_rejects_ranks_that_are_not_a_positive_int(ranks):
    error = ValueError if type(ranks) is int else TypeError  # a bool is not a count
    with pytest.raises(error, match=f"ranks must be a positive int, got {ranks!r}"):
        RunContext(quick=True, seeds=(0,), out_dir=Path("."), device=torch.device("cpu"),
                   cache=RunCache(None), progress=lambda it=None, **kw: it,
                   dataset=lambda: None, ranks=ranks)


def test_reproduce_trains_a_2d_resnet_on_cifar10_pickles(tmp_path):
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    for name, n in [("data_batch_1", 160), ("data_batch_2", 160), ("test_batch", 64)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, n))}
        with open(tmp_path / name, "wb") as f:
            pickle.dump(batch, f)
    out = tmp_path / "out"
    assert main(["reproduce", "--tiny", "--data", str(tmp_path), "--only", "precise-batch",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["data"] == str(tmp_path)
    assert "CIFAR-10" in (out / "report.md").read_text()


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rethinkbn reproduce: error: "), err
    assert all(w in err for w in words), err
    assert "Traceback" not in err


def _no_work(monkeypatch):
    """Fail the test if a study starts or data are loaded: options are checked before work."""
    def boom(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(harness, "load_data", boom)


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    target = tmp_path / "a-file"
    target.write_text("x")
    assert main(["reproduce", "--quick", "--out", str(target)]) == 2
    _one_line_error(capsys, "--out", str(target), "file")
    assert main(["reproduce", "--quick", "--out", str(target / "below")]) == 2
    _one_line_error(capsys, "--out", "cannot write")
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "ok"),
                 "--cache", str(target)]) == 2
    _one_line_error(capsys, "--cache", str(target))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_in_a_read_only_directory_is_refused_before_any_work(tmp_path, capsys,
                                                                 monkeypatch):
    _no_work(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["reproduce", "--quick", "--out", str(locked / "out")]) == 2
    finally:
        locked.chmod(0o700)
    _one_line_error(capsys, "--out", "cannot write")


def test_out_on_a_file_system_that_refuses_writes_is_refused_even_for_root(capsys, monkeypatch):
    target = Path("/sys/rethinkbn-test-out")  # sysfs: no new directories, whoever asks
    try:
        target.mkdir()
    except OSError:
        pass
    else:
        target.rmdir()
        pytest.skip("/sys accepts new directories here")
    _no_work(monkeypatch)
    assert main(["reproduce", "--quick", "--out", str(target)]) == 2
    _one_line_error(capsys, "--out", str(target), "cannot write")


@pytest.mark.parametrize("only", ["leakage", "nbs,leakage"])
def test_ranks_that_do_not_split_the_leakage_step_are_refused_before_any_work(
        only, tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    assert main(["reproduce", "--quick", "--only", only, "--ranks", "3",
                 "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "--ranks 3", "[1, 2, 4]")


def test_ranks_without_the_study_that_uses_them_is_refused(tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    assert main(["reproduce", "--quick", "--only", "nbs", "--ranks", "2",
                 "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "--ranks 2", "leakage")


@pytest.mark.parametrize("spec", ["mnist1d:abc", "mnist1d:5", "mnist1d:"])
def test_bad_mnist1d_sample_count_is_refused_before_any_work(spec, tmp_path, capsys,
                                                             monkeypatch):
    _no_work(monkeypatch)
    assert main(["reproduce", "--data", spec, "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "--data", spec)


@pytest.mark.parametrize("module", ["rethinkbn_studies", "matplotlib"])
def test_without_the_studies_extra_the_commands_say_how_to_install_it(module, monkeypatch,
                                                                      capsys):
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled module looks like
    assert main(["studies"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"missing: {module}" in err
    assert "pip install 'rethinkbn[studies]'" in err

