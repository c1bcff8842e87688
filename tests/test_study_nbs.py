"""Sec. 4 (nbs): the verdicts follow from the numbers, their preconditions, the training fit;
the study end to end."""

import json

import pytest

from rethinkbn_studies.studies import nbs
from study_cases import draws


# ---------------------------------------------------------------------------- nbs
def fig5_case(change=None, independent=False):
    from rethinkbn_studies.contract import paper

    keep = (2, 1024)
    mean = {k: {str(n): v for n, v in curve.items() if n in keep}
            for k, curve in paper.FIG5_NBS.items()}
    mean["val_pop"]["32"] = 23.4  # the best NBS between the two ends
    mean["val_pop_step"] = dict(mean["val_pop"])
    # training error with population stats: equal at both ends (the fit check passes)
    mean["train_pop"] = {"2": mean["train_mub"]["1024"], "1024": mean["train_mub"]["1024"]}
    for curve, nbs_key, value in change or []:
        mean[curve][nbs_key] = value
    wrong_of = draws(independent=independent)
    wrong = {k: {n: wrong_of(v) for n, v in curve.items()} for k, curve in mean.items()}
    return {"mean": mean}, wrong


def test_nbs_verdicts_agree_on_the_papers_own_curves(labels):
    assert labels(nbs.verdicts(*fig5_case())) == ["agrees"] * 6


@pytest.mark.parametrize(("change", "row", "label"), [
    ([("val_pop", "2", 23.8)], 0, "disagrees"),
    ([("val_pop", "2", 24.5), ("val_pop_step", "2", 24.5)], 0, "inconclusive"),
    ([("val_mub", "2", 36.0)], 1, "disagrees"),
    ([("val_mub", "2", 34.0)], 2, "disagrees"),
    ([("val_mub", "2", 32.4)], 2, "inconclusive"),
    ([("train_mub", "2", 5.0)], 3, "disagrees"),
    ([("val_pop_frozen", "2", 33.0)], 4, "disagrees"),
    ([("val_pop_frozen", "2", 32.4)], 4, "inconclusive"),
    ([("val_pop_frozen", "1024", 22.0)], 5, "disagrees"),
    ([("val_pop_frozen", "1024", 23.2)], 5, "inconclusive"),
])
def test_nbs_verdict_outcomes_follow_their_numbers(change, row, label):
    v = nbs.verdicts(*fig5_case(change))[row].verdict
    assert v.label == label
    assert v.interval[0] <= v.effect <= v.interval[1]
    assert "paired bootstrap over" in v.test and "3 seeds" in v.test


def test_nbs_frozen_verdict_states_effect_test_and_mcnemar():
    v = nbs.verdicts(*fig5_case([("val_pop_frozen", "2", 32.4)]))[4].verdict
    assert v.effect == pytest.approx(32.5 - 32.4, abs=0.2)
    assert "McNemar" in v.detail


def test_every_part1_verdict_can_be_inconclusive_with_noisy_small_samples():
    """Independent draws on 2000 samples: tiny effects sit inside the noise."""
    rows = nbs.verdicts(*fig5_case([("val_pop", "2", 24.0), ("val_pop_step", "2", 24.0)],
                                   independent=True))
    assert rows[0].verdict.label == "inconclusive"


def fit_case(gaps, train=5.0):
    """Per NBS, training error ``train`` and validation error ``train + gap`` with mini-batch
    statistics, as per-seed 0/1 vectors (shared draws: paired, low noise)."""
    wrong_of = draws()
    mean = {"train_mub": {k: train for k in gaps},
            "val_mub": {k: train + g for k, g in gaps.items()}}
    wrong = {c: {k: wrong_of(v) for k, v in curve.items()} for c, curve in mean.items()}
    return {"mean": mean}, wrong


def test_training_fit_gap_is_val_minus_train_error_with_minibatch_stats():
    _, wrong = fit_case({"2": 18.0, "128": 12.0})
    fits = nbs.training_fit(wrong)
    assert list(fits) == ["2", "128"]
    for k, v in fits.items():
        # The slow reference: count the errors one sample and seed at a time.
        val = sum(int(x) for w in wrong["val_mub"][k] for x in w)
        train = sum(int(x) for w in wrong["train_mub"][k] for x in w)
        total = sum(len(w) for w in wrong["val_mub"][k])
        assert v.effect == pytest.approx(100.0 * (val - train) / total)
        assert v.interval[0] <= v.effect <= v.interval[1]
        assert "3 seeds" in v.test


@pytest.mark.parametrize(("gap", "label", "word", "groups", "says"), [
    (18.0, "agrees", "yes", "holds at NBS 2, 4; fails at NBS 128.",
     "judged on models that have fit their training set"),
    (4.0, "disagrees", "no", "holds at NBS 4; fails at NBS 2, 128.",
     "have not fit their training set"),
    (10.2, "inconclusive", "within the noise",
     "holds at NBS 4; fails at NBS 128; is within the noise of the margin at NBS 2.",
     "not decided"),
])
def test_training_fit_table_and_note_say_each_outcome(gap, label, word, groups, says):
    numbers, wrong = fit_case({"2": gap, "4": 18.0, "128": 4.0})
    fits = nbs.training_fit(wrong)
    assert fits["2"].label == label
    note = nbs.training_fit_note(fits, 40)
    assert f"the criterion {groups}" in note and says in note
    assert "after 40 epochs" in note and "10 pt" in note
    rows = nbs.training_fit_table(numbers, fits).rows
    assert [r[0] for r in rows] == ["128", "4", "2"]  # largest NBS first, as the main table
    assert rows[-1][4] == word and rows[0][4] == "no"
    assert rows[-1][1] == pytest.approx(5.0) and rows[-1][2] == pytest.approx(5.0 + gap)


# issue 20: preconditions fixed in advance turn a claim "not testable" instead of "disagrees"
def test_nbs_pop_rise_is_against_the_largest_nbs_and_needs_the_fit_check():
    rows = nbs.verdicts(*fig5_case())
    assert "val_pop(NBS=1024)" in rows[0].verdict.criterion  # a fixed reference, not the best
    under = nbs.verdicts(*fig5_case([("train_pop", "2", 10.0 + nbs.POP_FIT_MARGIN)]))
    assert under[0].verdict.label == "not testable"
    assert "under-fit" in under[0].verdict.precondition


def test_nbs_regularization_needs_training_error_above_the_floor():
    v = nbs.verdicts(*fig5_case([("train_mub", "2", nbs.REGULARIZATION_FLOOR / 2)]))[3].verdict
    assert v.label == "not testable" and "floor" in v.precondition


def test_nbs_frozen_claim_needs_a_population_statistics_penalty():
    v = nbs.verdicts(*fig5_case([("val_pop_step", "2", 23.9)]))[4].verdict
    assert v.label == "not testable" and "penalty" in v.precondition


def test_nbs_study_reports_the_mechanism(tiny_out, tiny_data, one_thread):

    from rethinkbn.cli import main

    assert main(["reproduce", "--tiny", "--data", tiny_data, "--only", "nbs",
                 "--out", str(tiny_out), "--jobs", "1"]) == 0
    report = (tiny_out / "report.md").read_text()
    assert "between-sample share" in report and "**Mechanism**" in report
    numbers = json.loads((tiny_out / "results.json").read_text())["studies"]["nbs"]["numbers"]
    for per_layer in numbers["between_sample_share"].values():
        assert all(0.0 <= v <= 1.0 for v in per_layer.values())
    assert set(numbers["mean"]["val_mub_large"]) == set(numbers["mean"]["val_pop"])
