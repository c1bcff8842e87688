"""Sec. 3.2, Table 2 (precise-batch): the verdicts follow from the numbers."""


import pytest

from rethinkbn_studies.studies import precise_batch
from study_cases import draws


# ---------------------------------------------------------------------------- precise-batch
def table2_case(change=None, independent=False):
    cols = ["EMA", "B=2", "B=10", "B=100", "B=1000", "B=N"]
    mean = {"32": dict(zip(cols, [23.7, 28.8, 24.0, 23.5, 23.5, 23.5], strict=True)),
            "2": dict(zip(cols, [35.5, 34.4, 32.3, 32.0, 32.0, 32.0], strict=True))}
    for nbs_key, col, value in change or []:
        mean[nbs_key][col] = value
    wrong_of = draws(independent=independent)
    wrong = {k: {c: wrong_of(v) for c, v in row.items()} for k, row in mean.items()}
    return {"mean": mean}, wrong


def test_precise_batch_verdicts_agree_on_the_papers_own_table(labels):
    assert labels(precise_batch.verdicts(*table2_case())) == ["agrees"] * 4


@pytest.mark.parametrize(
    ("change", "row", "label"),
    [([("32", "B=2", 23.6)], 0, "disagrees"), ([("32", "B=2", 24.0)], 0, "inconclusive"),
     ([("32", "B=100", 25.0)], 1, "disagrees"), ([("32", "B=100", 23.9)], 1, "inconclusive"),
     ([("2", "EMA", 31.0)], 2, "disagrees"), ([("2", "EMA", 32.0)], 2, "inconclusive"),
     ([("2", "B=N", 23.5)], 3, "disagrees"), ([("2", "B=N", 24.0)], 3, "inconclusive")],
)
def test_precise_batch_verdict_outcomes_follow_their_numbers(change, row, label, labels):
    rows = precise_batch.verdicts(*table2_case(change))
    assert rows[row].verdict.label == label
    assert labels(rows).count("agrees") == 3
    assert "McNemar" in rows[row].verdict.detail
