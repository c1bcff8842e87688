"""Noise-aware verdicts: each decision agrees, disagrees or is inconclusive on numbers made for it,
and each interval is checked against a slow, obvious computation."""

import math

import numpy as np
import pytest

from rethinkbn_studies.contract.base import AGREES, DISAGREES, INCONCLUSIVE
from rethinkbn_studies.contract.verdicts import (
    Interval,
    equivalent,
    exceeds,
    mcnemar,
    paired_bootstrap,
    seed_interval,
    stays_below,
)


def _errors(rate, n=2000, seeds=1, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((seeds, n)) < rate).astype(float)


def _interval(low, high):
    return Interval((low + high) / 2, low, high, 0.95, "made up")


@pytest.mark.parametrize(("low", "high", "outcome"), [
    (0.5, 2.0, AGREES), (-2.0, -0.5, DISAGREES), (-0.5, 1.5, INCONCLUSIVE)])
def test_exceeds_needs_the_whole_interval_on_one_side(low, high, outcome):
    v = exceeds("effect > 0", _interval(low, high))
    assert v.label == outcome and v.agrees == (outcome == AGREES)
    assert v.interval == (low, high) and v.test == "made up"


@pytest.mark.parametrize(("low", "high", "outcome"), [
    (-1.0, 0.4, AGREES), (0.6, 2.0, DISAGREES), (0.0, 1.0, INCONCLUSIVE)])
def test_stays_below_a_margin(low, high, outcome):
    assert stays_below("effect < 0.5 pt", _interval(low, high), 0.5).label == outcome


@pytest.mark.parametrize(("low", "high", "outcome"), [
    (-0.4, 0.3, AGREES), (1.2, 2.0, DISAGREES), (-1.5, -1.1, DISAGREES),
    (-0.2, 1.5, INCONCLUSIVE)])
def test_equivalence_needs_the_interval_inside_the_margin(low, high, outcome):
    assert equivalent("|effect| <= 1 pt", _interval(low, high), 1.0).label == outcome


def test_equivalence_refuses_a_margin_that_is_not_positive():
    with pytest.raises(ValueError, match="margin"):
        equivalent("x", _interval(-1, 1), 0.0)


@pytest.mark.parametrize(("rate_b", "outcome"), [(0.05, AGREES), (0.15, DISAGREES),
                                                 (0.098, INCONCLUSIVE)])
def test_paired_bootstrap_decides_by_the_size_of_the_gap(rate_b, outcome):
    # A errs on 10% of 2000 samples; B on rate_b of them, on a subset of A's errors or a
    # superset (paired), so the gap's noise is that of the discordant samples only.
    rng = np.random.default_rng(1)
    u = rng.random(2000)
    a, b = (u < 0.10).astype(float), (u < rate_b).astype(float)
    interval = paired_bootstrap(a, b)
    assert interval.effect == pytest.approx(100 * (a.mean() - b.mean()))
    assert exceeds("err(A) - err(B) > 0", interval).label == outcome


def test_paired_bootstrap_interval_matches_a_loop_of_resamples():
    a, b = _errors(0.2, n=300, seeds=3, seed=2), _errors(0.15, n=300, seeds=3, seed=3)
    fast = paired_bootstrap(a, b, resamples=4000, seed=5)
    rng = np.random.default_rng(7)
    slow = []
    for _ in range(4000):  # draw seeds, then samples, and take the mean difference
        seeds = rng.integers(0, 3, 3)
        samples = rng.integers(0, 300, 300)
        slow.append(100 * (a[seeds][:, samples] - b[seeds][:, samples]).mean())
    low, high = np.quantile(slow, [0.025, 0.975])
    assert fast.low == pytest.approx(low, abs=0.6) and fast.high == pytest.approx(high, abs=0.6)
    assert "300 validation samples and 3 seeds" in fast.test


def test_pairing_makes_the_interval_narrower_than_for_independent_samples():
    rng = np.random.default_rng(4)
    u = rng.random(2000)
    a, b = (u < 0.12).astype(float), (u < 0.10).astype(float)
    paired = paired_bootstrap(a, b)
    unpaired = paired_bootstrap(a, rng.permutation(b))
    assert paired.high - paired.low < 0.5 * (unpaired.high - unpaired.low)


def test_paired_bootstrap_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same seeds and samples"):
        paired_bootstrap(np.zeros((2, 10)), np.zeros((2, 11)))


@pytest.mark.parametrize(("diffs", "outcome"), [([1.0, 1.2, 0.9], AGREES),
                                                ([-1.0, -1.3, -0.8], DISAGREES),
                                                ([1.0, -1.2, 0.4], INCONCLUSIVE)])
def test_seed_interval_is_students_t(diffs, outcome):
    interval = seed_interval(diffs)
    d = np.array(diffs)
    half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert interval.low == pytest.approx(d.mean() - half)
    assert interval.high == pytest.approx(d.mean() + half)
    assert exceeds("effect > 0", interval).label == outcome


def test_seed_interval_needs_three_seeds():
    with pytest.raises(ValueError, match=">= 3"):
        seed_interval([1.0, 2.0])


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_samples():
    a = np.array([1] * 10 + [0] * 2 + [1] * 5 + [0] * 30)  # 10 only A, 2 only B, 5 both
    b = np.array([0] * 10 + [1] * 2 + [1] * 5 + [0] * 30)
    test = mcnemar(a, b)
    expected = 2 * sum(math.comb(12, k) for k in range(3)) / 2 ** 12
    assert (test.only_a, test.only_b) == (10, 2) and test.p == pytest.approx(expected)
    assert mcnemar(a, a).p == 1.0
    assert mcnemar(np.ones(20), np.zeros(20)).p < 1e-5


# ---------------------------------------------------------------- not testable (issue 20)
def test_given_turns_an_absent_precondition_into_not_testable() -> None:
    from rethinkbn_studies.contract.base import NOT_TESTABLE, Verdict
    from rethinkbn_studies.contract.verdicts import Interval, exceeds, given

    judged = exceeds("pop rises", Interval(-2.0, -3.0, -1.0, 0.95, "t"))
    assert judged.label == "disagrees"
    v = given(False, "train error with pop stats 12.0% vs 1.0% (margin 2 pt)", judged)
    assert v.label == NOT_TESTABLE and not v.agrees
    assert "precondition unmet: train error" in v.line()
    assert v.to_json()["precondition"].startswith("train error")
    assert "not testable" in v.what_would_change()
    assert given(True, "unused", judged) is judged
    with pytest.raises(ValueError, match="precondition"):
        Verdict(agrees=False, criterion="c", outcome=NOT_TESTABLE)
    with pytest.raises(ValueError, match="precondition"):
        Verdict(agrees=True, criterion="c", outcome="agrees", precondition="x")


def test_combinators_leave_untestable_parts_out() -> None:
    from rethinkbn_studies.contract.base import NOT_TESTABLE
    from rethinkbn_studies.contract.verdicts import (
        Interval,
        all_hold,
        exceeds,
        majority_hold,
        not_testable,
    )

    yes = exceeds("a", Interval(2.0, 1.0, 3.0, 0.95, "t"))
    no = exceeds("b", Interval(-2.0, -3.0, -1.0, 0.95, "t"))
    nt = not_testable("c", "no penalty to remove")
    assert all_hold("all", [yes, nt]).label == "agrees"
    assert all_hold("all", [no, nt]).label == "disagrees"
    assert all_hold("all", [nt, nt]).label == NOT_TESTABLE
    assert majority_hold("most", [yes, nt, nt]).label == "agrees"
    assert majority_hold("most", [nt]).label == NOT_TESTABLE
    with pytest.raises(ValueError, match="precondition"):
        not_testable("c", "")


def test_headline_counts_the_papers_claims_apart() -> None:
    from rethinkbn_studies.contract.report import headline

    rows = [("agrees", True), ("not testable", True), ("disagrees", True), ("agrees", False)]
    assert headline(rows) == (
        "of 3 paper claims, 1 agree, 0 are inconclusive, 1 disagree, 1 are not testable; "
        "of 1 ablations and mechanism checks of ours, 1 agree, 0 are inconclusive, 0 disagree, "
        "0 are not testable")
    assert headline(rows, split=False) == (
        "2 of 4 claims agree, 0 are inconclusive, 1 disagree, 1 are not testable")


def test_a_row_not_in_the_paper_is_counted_apart_from_the_paper_s_claims():
    from rethinkbn_studies.contract.base import NOT_IN_PAPER, SummaryRow, verdict

    ours = SummaryRow("ablation", "1 vs 2", NOT_IN_PAPER, verdict("x", True))
    theirs = SummaryRow("claim", "1 vs 2", "3 vs 4", verdict("x", True))
    assert not ours.paper_claim and theirs.paper_claim
