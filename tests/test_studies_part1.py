"""Studies of Sec. 3-4: the verdicts follow from the numbers; the registry's contract."""

import copy

import numpy as np
import pytest

from rethinkbn_studies import ema_vs_precise, nbs, precise_batch
from rethinkbn_studies.base import (
    Table,
    get_study,
    mean_std,
    register_study,
    registered_studies,
    verdict,
)


# ---------------------------------------------------------------------------- ema-vs-precise
def ema_numbers():
    """Paper-like curves: the large batch's EMA lags early, the curves meet at the end."""
    return {
        "large_batch": 500,
        "curves": {
            "64": {"ema_mean": [30.0, 10.0, 5.0, 3.0], "precise_mean": [25.0, 8.0, 4.5, 3.0]},
            "500": {"ema_mean": [80.0, 60.0, 20.0, 9.0], "precise_mean": [60.0, 40.0, 15.0, 8.0]},
        },
        "fig2_outside": [0.8, 0.3, 0.0],
    }


def test_ema_verdicts_agree_on_paper_like_numbers(labels):
    assert labels(ema_vs_precise.verdicts(ema_numbers())) == ["agrees"] * 4


def test_ema_verdict_flips_when_precise_is_not_better_early():
    numbers = ema_numbers()
    numbers["curves"]["500"]["precise_mean"] = [80.0, 60.0, 20.0, 9.0]
    rows = ema_vs_precise.verdicts(numbers)
    assert rows[0].verdict.label == "disagrees"
    assert rows[0].verdict.detail == "+0.00 pt"


def test_ema_verdict_flips_when_curves_do_not_meet_at_the_end():
    numbers = ema_numbers()
    numbers["curves"]["64"]["ema_mean"][-1] = 6.0
    assert ema_vs_precise.verdicts(numbers)[2].verdict.label == "disagrees"


def test_fig2_verdict_flips_when_ema_is_outside_more_often_late():
    numbers = ema_numbers()
    numbers["fig2_outside"] = [0.1, 0.5]
    assert ema_vs_precise.verdicts(numbers)[3].verdict.label == "disagrees"


# ---------------------------------------------------------------------------- precise-batch
def table2_numbers():
    cols = ["EMA", "B=2", "B=10", "B=100", "B=1000", "B=N"]
    return {"mean": {"32": dict(zip(cols, [23.7, 28.8, 24.0, 23.5, 23.5, 23.5], strict=True)),
                     "2": dict(zip(cols, [35.5, 34.4, 32.3, 32.0, 32.0, 32.0], strict=True))}}


def test_precise_batch_verdicts_agree_on_the_papers_own_table(labels):
    assert labels(precise_batch.verdicts(table2_numbers())) == ["agrees"] * 4


@pytest.mark.parametrize(
    ("nbs_key", "column", "value", "row"),
    [("32", "B=2", 23.6, 0), ("32", "B=100", 25.0, 1), ("2", "EMA", 31.0, 2),
     ("2", "B=N", 23.9, 3)],
)
def test_precise_batch_verdict_flips_with_its_number(nbs_key, column, value, row, labels):
    numbers = copy.deepcopy(table2_numbers())
    numbers["mean"][nbs_key][column] = value
    rows = precise_batch.verdicts(numbers)
    assert rows[row].verdict.label == "disagrees"
    assert labels(rows).count("disagrees") == 1


# ---------------------------------------------------------------------------- nbs
def fig5_numbers():
    from rethinkbn_studies import paper

    keep = (2, 1024)
    return {"mean": {k: {str(n): v for n, v in curve.items() if n in keep}
                     for k, curve in paper.FIG5_NBS.items()}}


def fig5_wrong(numbers, samples=2000, seeds=3):
    """Per-sample errors at the mean rates of ``numbers``: per seed, the normal and the FrozenBN
    run err on the samples whose uniform draw is below their rate (paired, as two runs from one
    initialization on one validation set are)."""
    wrong = {"val_pop": {}, "val_pop_frozen": {}}
    for nbs_key in numbers["mean"]["val_pop"]:
        draws = [np.random.default_rng(s).random(samples) for s in range(seeds)]
        for curve in wrong:
            rate = numbers["mean"][curve][nbs_key] / 100
            wrong[curve][nbs_key] = [u < rate for u in draws]
    return wrong


def nbs_verdicts(numbers):
    return nbs.verdicts(numbers, fig5_wrong(numbers))


def test_nbs_verdicts_agree_on_the_papers_own_curves(labels):
    assert labels(nbs_verdicts(fig5_numbers())) == ["agrees"] * 5


@pytest.mark.parametrize(("frozen", "label"), [(33.0, "disagrees"), (32.4, "inconclusive")])
def test_nbs_frozen_verdict_at_small_nbs_has_three_outcomes(frozen, label, labels):
    numbers = fig5_numbers()
    numbers["mean"]["val_pop_frozen"]["2"] = frozen  # normal: 32.5
    rows = nbs_verdicts(numbers)
    assert rows[3].verdict.label == label and labels(rows).count("agrees") == 4
    v = rows[3].verdict
    assert v.effect == pytest.approx(32.5 - frozen, abs=0.2)  # the draws add a little noise
    assert v.interval[0] <= v.effect <= v.interval[1]
    assert "paired bootstrap over 2000 validation samples and 3 seeds" in v.test
    assert "McNemar" in v.detail


@pytest.mark.parametrize(("frozen", "label"), [(24.5, "agrees"), (22.0, "disagrees"),
                                               (23.2, "inconclusive")])
def test_nbs_frozen_verdict_at_large_nbs_has_three_outcomes(frozen, label):
    numbers = fig5_numbers()
    numbers["mean"]["val_pop_frozen"]["1024"] = frozen  # normal: 23.7; margin 0.5 pt
    assert nbs_verdicts(numbers)[4].verdict.label == label


def test_nbs_verdict_flips_when_the_inconsistency_does_not_grow():
    numbers = fig5_numbers()
    numbers["mean"]["val_mub"]["2"] = 34.0
    assert nbs_verdicts(numbers)[1].verdict.label == "disagrees"


def test_nbs_verdict_flips_when_small_nbs_is_not_worse():
    numbers = fig5_numbers()
    numbers["mean"]["val_pop"]["2"] = 23.8
    assert nbs_verdicts(numbers)[0].verdict.label == "disagrees"


def test_nbs_notes_explain_a_disagreement_only_when_there_is_one():
    numbers = fig5_numbers()
    assert "Unlike the paper" not in nbs.notes_for(numbers)
    numbers["mean"]["val_mub"]["2"] = 34.0
    assert "Unlike the paper" in nbs.notes_for(numbers)


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

    from rethinkbn_studies.base import RunContext
    from rethinkbn_studies.cache import RunCache
    from rethinkbn_studies.data import DataSplit

    x = torch.zeros(num_train, 1, 40)
    data = DataSplit(name, x, torch.zeros(num_train, dtype=torch.long), x[:100],
                     torch.zeros(100, dtype=torch.long), 10)
    return RunContext(quick=quick, seeds=(0,), out_dir=Path("."), device=torch.device("cpu"),
                      cache=RunCache(None), progress=lambda it=None, **k: it,
                      dataset=lambda: data)


def test_full_mode_keeps_mnist1d_small_but_uses_all_of_other_data():
    from rethinkbn_studies.common import scale_for

    full = scale_for(_ctx(False, "MNIST-1D", 8000), 10, 20, mnist1d_train_samples=2000)
    assert (full.num_train, full.epochs, full.widths) == (2000, 20, (16, 32, 64))
    other = scale_for(_ctx(False, "CIFAR-10", 8000), 10, 20, mnist1d_train_samples=2000)
    assert (other.num_train, other.widths) == (8000, (32, 64, 128))
    quick = scale_for(_ctx(True, "MNIST-1D", 8000), 10, 20)
    assert (quick.num_train, quick.epochs) == (2000, 10)
