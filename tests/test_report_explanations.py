"""Issue 20, item 4: every summary row that disagrees with the paper says, in its section, which
measured quantity explains it; the sentence is generated from the run's numbers."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rethinkbn.population import INCONSISTENCY_THRESHOLD
from rethinkbn_studies.contract.base import EXPLAINED, SummaryRow, Verdict, explain
from rethinkbn_studies.contract.report import section
from rethinkbn_studies.studies import multi_domain, nbs, precise_batch
from study_cases import draws

ROOT = Path(__file__).resolve().parents[1]
REPORTS = [ROOT / "docs/results/quick", ROOT / "docs/results/full"]


def _row(claim, agrees, outcome):
    return SummaryRow(claim, "1.0 vs 2.0", "3.0 vs 4.0",
                      Verdict(agrees=agrees, criterion="c", outcome=outcome))


# ------------------------------------------------------------------- the contract
def test_explain_attaches_a_text_to_disagreeing_rows_only():
    rows = [_row("a", False, "disagrees"), _row("b", True, "agrees"),
            _row("c", False, "inconclusive"), _row("d", False, "disagrees")]
    out = explain(rows, {"a": "because x", "b": "because y", "c": "because z"})
    assert [r.explanation for r in out] == ["because x", "", "", ""]
    assert [r.explanation for r in rows] == ["", "", "", ""]  # the input rows are unchanged


# ----------------------------------------------------------------------- nbs
def _nbs_numbers(bias=0.05, pop=(12.0, 13.5), fit=(0.0, 0.0), mub=(17.9, 12.5)):
    """Numbers of a sweep's ends (NBS 2 and 128), the shape :func:`nbs.summarize` gives."""
    return {"mean": {"val_pop": {"2": pop[0], "128": pop[1]},
                     "train_pop": {"2": fit[0], "128": fit[1]},
                     "val_mub": {"2": mub[0], "128": 14.8},
                     "val_mub_large": {"2": mub[1], "128": 14.8}},
            "scale": {"num_train": 1000, "num_val": 2000},
            "between_sample_share": {"2": {"a": 0.03, "b": 2 * bias}},
            "variance_bias": {"2": {"a": -0.015, "b": -bias}}}


def test_rise_explanation_names_the_bias_and_the_regularizing_noise():
    text = nbs.rise_explanation(_nbs_numbers(), "2", "128")
    assert "at most -5.0% (largest between-sample share 0.100), is below the 10% threshold" in text
    assert "no train/test inconsistency for population statistics to pay" in text
    assert "an ImageNet ResNet's share: not known" in text  # issue 20: beside an ImageNet one's
    assert "generalize better (val_pop 12.0 vs 13.5)" in text and "regularizer" in text


def test_rise_explanation_without_a_gain_or_with_a_large_bias():
    no_gain = nbs.rise_explanation(_nbs_numbers(pop=(2.1, 1.9), fit=(0.4, 0.0)), "2", "128")
    assert "no regularizing gain" in no_gain and "0.4% vs 0.0%" in no_gain
    # a worse fit at NBS 2 than the margin: no "generalize better" either
    unfit = nbs.rise_explanation(_nbs_numbers(fit=(3.0, 0.0)), "2", "128")
    assert "generalize better" not in unfit
    big = nbs.rise_explanation(_nbs_numbers(bias=2 * INCONSISTENCY_THRESHOLD), "2", "128")
    assert big.startswith("not explained by the measured quantities") and "above" in big


@pytest.mark.parametrize(("mub", "bias", "says"), [
    ((17.9, 12.5), 0.05, "the noise of 2-sample groups, not an inconsistency"),
    ((17.9, 17.9), 0.05, "not explained by the measured quantities"),
    ((17.9, 12.5), 0.3, "not explained by the measured quantities"),
])
def test_noise_explanation_follows_the_large_group_error_and_the_bias(mub, bias, says):
    text = nbs.noise_explanation(_nbs_numbers(bias=bias, mub=mub), "2")
    assert text.startswith(says)
    assert f"mu_B over 128-sample groups is {mub[1]:.1f} (vs {mub[0]:.1f}" in text


def _frozen_wrong(step, frozen):
    wrong_of = draws()
    return {"val_pop_step": {k: wrong_of(v) for k, v in step.items()},
            "val_pop_frozen": {k: wrong_of(v) for k, v in frozen.items()}}


def test_frozen_explanation_compares_the_penalty_with_the_cost_of_freezing():
    # penalty 1.1 pt; freezing costs 1.1 pt where there is nothing to remove (quick report)
    wrong = _frozen_wrong({"2": 16.2, "128": 15.1}, {"2": 17.4, "128": 16.2})
    text = nbs.frozen_explanation(wrong, "2", "128")
    assert text.startswith("the penalty is no larger than what freezing itself costs")
    cost, gain = (nbs.paired_bootstrap(*nbs._frozen_pair(wrong, k)) for k in ("128", "2"))
    assert cost.text() in text and f"at NBS=2 FrozenBN's gain is {gain.effect:+.2f} pt" in text
    # a large penalty, a free freeze: the cost does not explain it
    wrong = _frozen_wrong({"2": 25.0, "128": 15.0}, {"2": 26.0, "128": 15.0})
    assert nbs.frozen_explanation(wrong, "2", "128").startswith("not explained")


def test_nbs_verdicts_explain_the_rows_that_disagree():
    from test_study_nbs import fig5_case

    numbers, wrong = fig5_case([("val_pop", "2", 23.8)])
    numbers.update({k: v for k, v in _nbs_numbers().items() if k not in ("mean",)})
    numbers["mean"]["val_mub_large"] = {"2": 24.0, "1024": 24.8}
    rows = nbs.verdicts(numbers, wrong)
    assert rows[0].verdict.label == "disagrees" and "nearly unbiased" in rows[0].explanation
    # every row that disagrees is explained, and only they
    assert [bool(r.explanation) for r in rows] == [r.verdict.label == "disagrees" for r in rows]
    assert [r.verdict.label for r in rows].count("agrees") >= 3


# -------------------------------------------------------------- multi-domain
def _sweep(shift, ratio, rise, row1):
    return {s: {"mean_shift": m, "std_ratio": r, "row2_minus_row1": d,
                "errors": {"shared/shared/shared": e}}
            for s, m, r, d, e in zip((0.0, 0.5, 1.0, 2.0, 3.0), shift, ratio, rise, row1,
                                     strict=True)}


def test_collapse_explanation_names_the_quantity_the_rise_follows():
    # the full report's sweep: the rise follows the mean shift, not the std ratio
    sweep = _sweep([0.55, 3.89, 5.40, 8.21, 5.62], [1.33, 1.80, 2.58, 4.90, 8.30],
                   [1.52, 11.66, 21.53, 28.29, 3.93], [3.6, 9.0, 20.9, 33.8, 49.8])
    text = multi_domain.collapse_explanation(sweep, None)
    assert "follows the levels' measured mean shift" in text
    assert "mean shift +0.70; std ratio +0.40" in text
    assert ("at separation 1.0: mean shift 5.40, rise +21.53 pt, 31% of the way to chance from "
            "the consistent row's 20.9 (collapse threshold 34.5 pt)") in text
    assert "separation 2.0: mean shift 8.21" in text and "no separation collapses" in text
    # there the point estimate (+28.29) is past the threshold (28.1) but not its whole interval
    assert "at separation 2.0 the rise reaches the threshold within its noise" in text
    assert "not large enough here" not in text
    assert "collapses from separation 2.0 on" in multi_domain.collapse_explanation(sweep, 2.0)


def test_collapse_explanation_without_a_rise_near_the_threshold():
    sweep = _sweep([0.5, 1.0, 2.0, 3.0, 4.0], [1.0, 1.2, 1.4, 1.6, 1.8],
                   [1.0, 2.0, 3.0, 4.0, 5.0], [10.0] * 5)
    text = multi_domain.collapse_explanation(sweep, None)
    assert "no separation collapses, so the levels' measured mean shift is not large enough" in text
    assert "within its noise" not in text


def test_collapse_explanation_says_plainly_when_nothing_measured_explains_it():
    sweep = _sweep([5.0, 4.0, 3.0, 2.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0],
                   [1.0, 2.0, 3.0, 4.0, 5.0], [10.0] * 5)
    text = multi_domain.collapse_explanation(sweep, None)
    assert text.startswith("not explained by the measured quantities")
    assert "follows neither measured quantity" in text


# ------------------------------------------------------------- precise-batch
def test_per_batch_bias_against_a_slow_simulation():
    """The average of 2-sample batches' unbiased variances over the pooled variance, on planted
    data (sample i, value j: a_i + e_ij), float64, against :func:`per_batch_bias`."""
    rng = np.random.default_rng(0)
    n, length, rho = 20000, 10, 0.3
    x = (rng.normal(0, math.sqrt(rho), (n, 1))
         + rng.normal(0, math.sqrt(1 - rho), (n, length)))
    share = x.mean(1).var() / x.var()
    batches = [x[i: i + 2].ravel().var(ddof=1) for i in range(0, n, 2)]
    measured = float(np.mean(batches)) / x.var(ddof=1) - 1
    assert precise_batch.per_batch_bias(share, length) == pytest.approx(measured, abs=0.01)
    assert precise_batch.per_batch_bias(0.0, 1e9) == pytest.approx(0.0, abs=1e-6)


def _pb_numbers(share2=0.116, share32=0.27, log_ratio=-0.046):
    layers = {"x": [0.0, 0.01, -0.001], "y": [0.02, 0.05, log_ratio]}
    return {"mean": {"2": {"B=2": 11.9, "B=N": 12.0}, "32": {"B=N": 13.5}},
            "between_sample_share": {"2": {"x": {"share": 0.03, "length": 40.0},
                                           "y": {"share": share2, "length": 10.0}},
                                     "32": {"x": {"share": 0.05, "length": 40.0},
                                            "y": {"share": share32, "length": 10.0}}},
            "layers_b2": {"32": {precise_batch.PER_BATCH_LAYERS: layers}}}


def test_tiny_nbs_explanation_names_the_share_bias_and_b2_statistics():
    text = precise_batch.tiny_nbs_explanation(_pb_numbers())
    assert "largest between-sample share is 0.116" in text and "at most -5.8%" in text
    assert "gives 11.9 vs 12.0 at B=N" in text and text.startswith("its training statistics")
    assert precise_batch.tiny_nbs_explanation(_pb_numbers(share2=0.5)).startswith("not explained")


def test_estimator_explanation_compares_measured_and_expected_bias():
    text = precise_batch.estimator_explanation(_pb_numbers())
    expected = precise_batch.per_batch_bias(0.27, 10.0)
    assert f"{100 * expected:+.1f}% in y" in text
    assert f"{100 * (math.exp(2 * -0.046) - 1):+.1f}% in y" in text
    assert text.startswith("the estimator's bias is too small to move the error")
    large = precise_batch.estimator_explanation(_pb_numbers(share32=0.6, log_ratio=-0.2))
    assert large.startswith("not explained")


def test_precise_batch_explanations_need_the_shares():
    assert precise_batch.explanations({"mean": {}}) == {}
    texts = precise_batch.explanations(_pb_numbers())
    assert set(texts) == {precise_batch.TINY_NBS_CLAIM, precise_batch.ESTIMATOR_CLAIM}


# -------------------------------------------------------- the committed reports
def _disagreeing(folder):
    results = json.loads((folder / "results.json").read_text())
    return [(name, row) for name, study in results["studies"].items()
            for row in study.get("summary", []) if row["verdict"] == "disagrees"]


@pytest.mark.parametrize("folder", REPORTS, ids=lambda f: f.name)
def test_every_disagreeing_row_of_a_committed_report_is_explained(folder):
    report = (folder / "report.md").read_text()
    rows = _disagreeing(folder)
    assert rows
    for name, row in rows:
        assert row.get("explanation"), (name, row["claim"])
        line = next(ln for ln in section(report, name).splitlines()
                    if ln.startswith(f"- {row['claim']}: **disagrees**"))
        assert f"**{EXPLAINED}** {row['explanation']}" in line
    # and only they: an agreeing, inconclusive or not testable row carries none
    results = json.loads((folder / "results.json").read_text())
    assert all("explanation" not in r for s in results["studies"].values()
               for r in s.get("summary", []) if r["verdict"] != "disagrees")
