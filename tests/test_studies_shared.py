"""What every study shares: the registry's contract, tables, scales and ghost models; the
studies of Sec. 5-6 end to end, with one and two jobs."""

import json
import shutil

import pytest
import torch

from rethinkbn_studies.contract.base import (
    Table,
    get_study,
    mean_std,
    register_study,
    registered_studies,
    verdict,
)
from rethinkbn_studies.infra.harness import reproduce


# ---------------------------------------------------------------------------- registry, helpers
def test_part1_studies_are_registered_in_report_order():
    names = [s.name for s in registered_studies()]
    assert names[:3] == ["ema-vs-precise", "precise-batch", "nbs"]


def test_unknown_study_error_lists_the_known_ones():
    with pytest.raises(KeyError, match="ema-vs-precise"):
        get_study("emma")


def test_register_study_rejects_bad_names_and_a_second_owner():
    with pytest.raises(ValueError, match="lowercase"):
        register_study("Bad Name", "x")
    with pytest.raises(ValueError, match="already registered"):
        register_study("nbs", "again")(lambda ctx: None)


def test_verdict_line_shows_label_criterion_and_detail():
    v = verdict("a > b", 2 > 1, "2 > 1")
    assert v.line() == "**agrees** — a > b (2 > 1)"
    assert verdict("a > b", False).label == "disagrees"


def test_mean_std_over_seeds():
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)


def test_table_formats_mean_std_cells():
    table = Table("t", ["a", "b"], [["x", (1.234, 0.05)], ["y", 2.0]])
    assert "| x | 1.2 ± 0.1 |" in table.to_markdown()
    assert "| y | 2.0 |" in table.to_markdown()


def _ctx(quick, name, num_train):
    from pathlib import Path

    import torch

    from rethinkbn_studies.contract.base import RunContext
    from rethinkbn_studies.infra.cache import RunCache
    from rethinkbn_studies.toolkit.data import DataSplit

    x = torch.zeros(num_train, 1, 40)
    data = DataSplit(name, x, torch.zeros(num_train, dtype=torch.long), x[:100],
                     torch.zeros(100, dtype=torch.long), 10)
    return RunContext(quick=quick, seeds=(0,), out_dir=Path("."), device=torch.device("cpu"),
                      cache=RunCache(None), progress=lambda it=None, **k: it,
                      dataset=lambda: data)


def test_full_mode_keeps_mnist1d_small_but_uses_all_of_other_data():
    from rethinkbn_studies.toolkit.common import scale_for

    full = scale_for(_ctx(False, "MNIST-1D", 8000), 10, 20, mnist1d_train_samples=2000)
    assert (full.num_train, full.epochs, full.widths) == (2000, 20, (16, 32, 64))
    other = scale_for(_ctx(False, "CIFAR-10", 8000), 10, 20, mnist1d_train_samples=2000)
    assert (other.num_train, other.widths) == (8000, (32, 64, 128))
    quick = scale_for(_ctx(True, "MNIST-1D", 8000), 10, 20)
    assert (quick.num_train, quick.epochs) == (2000, 10)


def test_ghost_models_train_longer_on_fewer_mnist1d_samples_in_both_modes():
    from rethinkbn_studies.toolkit.common import GHOST_EPOCHS, GHOST_MNIST1D_SAMPLES, ghost_scale

    quick, full = GHOST_EPOCHS
    assert full >= quick  # full mode trains at least as long
    q = ghost_scale(_ctx(True, "MNIST-1D", 8000))
    f = ghost_scale(_ctx(False, "MNIST-1D", 8000))
    assert (q.num_train, q.epochs, q.widths) == (GHOST_MNIST1D_SAMPLES, quick, (16, 32, 64))
    assert (f.num_train, f.epochs, f.widths) == (GHOST_MNIST1D_SAMPLES, full, (16, 32, 64))
    other = ghost_scale(_ctx(True, "CIFAR-10", 8000))
    assert (other.num_train, other.epochs) == (2000, quick)


def test_a_deeper_ghost_model_has_a_key_of_its_own_and_the_one_block_keys_stay():
    from rethinkbn_studies.infra.cache import config_key
    from rethinkbn_studies.toolkit.common import (
        GHOST_LR,
        GHOST_SGD_BATCH,
        ghost_model_task,
        ghost_scale,
    )

    ctx = _ctx(True, "MNIST-1D", 8000)
    scale = ghost_scale(ctx)
    old = {"model": "ghost-resnet", "v": 2, "data": "mnist1d:corr0.6", "nbs": 32, "seed": 1,
           "sgd_batch": GHOST_SGD_BATCH, "lr": GHOST_LR, "scale": scale.as_dict()}
    assert ghost_model_task(ctx, scale, 32, 1).config == old  # the key before `blocks` existed
    assert ghost_model_task(ctx, scale, 32, 1, blocks=1).config == old
    deep = ghost_model_task(ctx, scale, 32, 1, blocks=2)
    assert deep.config == {**old, "blocks": 2} and deep.args[-1] == 2
    assert config_key(ghost_model_task(ctx, scale, 32, 1).config) == config_key(old)
    assert config_key(deep.config) != config_key(old)


def test_ghost_model_loads_a_deeper_model_with_the_same_blocks():
    import torch

    from rethinkbn_studies.toolkit import bn
    from rethinkbn_studies.toolkit.common import Scale, ghost_model, new_model

    ctx = _ctx(True, "MNIST-1D", 200)
    scale = Scale(200, 100, 1, (4, 8))
    deep = new_model(ctx, ctx.dataset(), scale, 0, blocks=2)
    assert len(deep.stages) == 4  # 2 stages x 2 blocks
    trained = {"state": bn.set_norm_batch_size(deep, 32).state_dict()}
    loaded = ghost_model(ctx, scale, 32, 0, trained, blocks=2)
    assert all(torch.equal(v, trained["state"][k]) for k, v in loaded.state_dict().items())
    with pytest.raises(RuntimeError):  # a one-block model has no room for the second blocks
        ghost_model(ctx, scale, 32, 0, trained)


PART2 = ["domain-shift", "multi-domain", "leakage"]


# ---------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("study", PART2)
def test_study_runs_end_to_end_and_reports_every_number(study, tiny_out, tiny_data, quiet,
                                                        one_thread):
    report, outcomes = reproduce([study], tiny=True, data=tiny_data, out_dir=tiny_out,
                                 progress=quiet, log=None)
    (outcome,) = outcomes
    assert outcome.error is None, outcome.error
    text = report.read_text()
    assert f"`{study}`" in text and ("agrees" in text or "disagrees" in text)
    results = json.loads((tiny_out / "results.json").read_text())
    assert json.dumps(results)  # every number is plain JSON
    for plot in outcome.result.plots:
        assert (tiny_out / plot).stat().st_size > 0



@pytest.fixture(scope="module")
def by_jobs(tmp_path_factory, tiny_data, data_file):
    """The three studies run tiny with ``jobs`` 1 and 2: per ``jobs``, the progress bars drawn
    here (their descs), the studies' results and the names of the cached runs."""
    out = {}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for jobs in (1, 2):
            bars = []

            def recording(iterable=None, *, desc=None, total=None, leave=False, bars=bars):
                bars.append(desc)
                return iterable

            root = tmp_path_factory.mktemp(f"jobs{jobs}")
            (root / "cache").mkdir()
            shutil.copy(data_file, root / "cache")
            _, outcomes = reproduce(PART2, tiny=True, data=tiny_data, out_dir=root,
                                    progress=recording, log=None, jobs=jobs)
            assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
            studies = json.loads((root / "results.json").read_text())["studies"]
            out[jobs] = {"bars": bars,
                         "results": {n: {k: v for k, v in s.items() if k != "wall_time_s"}
                                     for n, s in studies.items()},
                         "cached": sorted(p.name for p in (root / "cache").glob("*.pt"))}
    finally:
        torch.set_num_threads(before)
    return out


def test_studies_draw_a_bar_over_their_runs_and_their_epochs(by_jobs):
    bars = by_jobs[1]["bars"]
    for study in PART2:
        assert f"{study} runs" in bars
    assert len(bars) > len(PART2)  # and, inside, bars over the runs' epochs


def test_studies_run_their_runs_in_the_worker_processes_with_two_jobs(by_jobs):
    # The epochs go by in the workers, which draw no bar: here only each study's bar is left.
    assert by_jobs[2]["bars"] == [f"{s} runs" for s in PART2]


def test_studies_give_the_same_numbers_with_two_jobs(by_jobs):
    assert by_jobs[2]["results"] == by_jobs[1]["results"]


def test_studies_cache_the_same_runs_under_the_same_keys_with_two_jobs(by_jobs):
    assert by_jobs[2]["cached"] == by_jobs[1]["cached"]
