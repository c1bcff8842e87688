"""Sec. 5.2, Table 5 (multi-domain): the verdicts follow from the numbers; levels and
domain-specific normalization."""


import pytest
import torch

from rethinkbn_studies.studies import multi_domain
from rethinkbn_studies.toolkit.data import load_mnist1d
from study_cases import errs

# ---------------------------------------------------------------------------- multi-domain
DOMAIN_RATES = {"shared/shared/shared": 10.0, "shared/domain/shared": 80.0,
                "domain/shared/shared": 30.0, "domain/domain/shared": 10.0,
                "domain/shared/domain": 25.0, "domain/domain/domain": 9.5,
                "GroupNorm": 10.5, "no norm": 11.0}


def domain_wrong(**rates):
    return {n: errs(r).astype(float) for n, r in {**DOMAIN_RATES, **rates}.items()}


def test_multi_domain_verdicts_agree_on_paper_like_numbers(labels):
    assert labels(multi_domain.verdicts(domain_wrong())) == ["agrees"] * 4


@pytest.mark.parametrize("rate, outcome", [(20.0, "disagrees"), (50.0, "inconclusive")])
def test_multi_domain_collapse_verdict_has_three_outcomes(labels, rate, outcome):
    wrong = domain_wrong(**{"shared/domain/shared": rate})
    assert labels(multi_domain.verdicts(wrong))[1] == outcome


@pytest.mark.parametrize("rate, outcome", [(5.0, "disagrees"), (10.0, "inconclusive")])
def test_multi_domain_consistency_verdict_flips_when_an_inconsistent_row_wins(labels, rate,
                                                                              outcome):
    wrong = domain_wrong(**{"domain/shared/shared": rate})
    assert labels(multi_domain.verdicts(wrong))[0] == outcome


@pytest.mark.parametrize("gn, outcome", [(25.0, "disagrees"), (12.0, "inconclusive")])
def test_group_norm_equivalence_uses_the_matched_heads(labels, gn, outcome):
    wrong = domain_wrong()
    wrong["GroupNorm (best lr)"] = errs(gn, shift=100).astype(float)
    wrong["no norm (best lr)"] = errs(40).astype(float)
    matched = {"GroupNorm": "GroupNorm (best lr)", "no norm": "no norm (best lr)",
               "bn": "domain/domain/shared"}
    assert labels(multi_domain.verdicts(wrong, matched))[3] == outcome


def test_collapse_separation_is_the_first_separation_above_the_threshold():
    # issue 20: relative to the consistent row (10%) and chance: a rise of > 40 pt collapses
    sweep = {s: {"shared/domain/shared": errs(r).astype(float),
                 "shared/shared/shared": errs(10.0).astype(float)}
             for s, r in ((0.0, 20.0), (1.0, 45.0), (2.0, 85.0), (3.0, 90.0))}
    assert multi_domain.collapse_separation(sweep) == 2.0
    assert multi_domain.collapse_separation({0.0: sweep[0.0]}) is None


def test_separation_gives_each_level_its_gain_and_offset():
    data = load_mnist1d(100)
    plain = multi_domain.build_model("domain/domain/shared", data, 8, seed=0)
    apart = multi_domain.build_model("domain/domain/shared", data, 8, seed=0, separation=1.0)
    seen = {}
    for name, model in (("plain", plain), ("apart", apart)):
        model.head.conv1.register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, args[0].view(3, 5, 8, -1)))
        model.eval()
        model(data.train_x[:5])
    for level, (gain, offset) in enumerate(((0.5, -1.0), (1.0, 0.0), (2.0, 1.0))):
        torch.testing.assert_close(seen["apart"][level], gain * seen["plain"][level] + offset)


def test_mean_of_levels_is_the_fixed_point_of_an_ema_over_the_levels_batches():
    """An EMA updated with each level's batch statistics in turn (the paper's shared
    population statistics) converges to the mean of the levels' means and variances."""
    data = load_mnist1d(100)
    per_level = multi_domain.build_model("domain/domain/shared", data, 8, seed=0)
    shared = multi_domain.build_model("domain/shared/shared", data, 8, seed=0)
    layer = per_level.head.norm1
    layer.running_mean.copy_(torch.tensor([[0.0] * 8, [1.0] * 8, [5.0] * 8]))
    layer.running_var.copy_(torch.tensor([[1.0] * 8, [4.0] * 8, [7.0] * 8]))
    multi_domain.mean_of_levels(shared, per_level)
    mean, var = torch.zeros(8), torch.ones(8)
    for _ in range(300):  # the EMA, momentum 0.1, levels in turn
        for level in range(3):
            mean = 0.9 * mean + 0.1 * layer.running_mean[level]
            var = 0.9 * var + 0.1 * layer.running_var[level]
    torch.testing.assert_close(shared.head.norm1.running_mean, mean, atol=0.3, rtol=0)
    torch.testing.assert_close(shared.head.norm1.running_mean, torch.full((8,), 2.0))
    torch.testing.assert_close(shared.head.norm1.running_var, torch.full((8,), 4.0))


def test_levels_are_the_domains_of_the_head_norm():
    data = load_mnist1d(100)
    model = multi_domain.build_model("domain/domain/shared", data, 8, seed=0)
    seen = []
    model.head.norm1.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    model.train()
    logits = model(data.train_x[:5])
    assert logits.shape == (multi_domain.NUM_LEVELS, 5, 10)
    assert torch.equal(seen[0], torch.arange(3).repeat_interleave(5))


def test_domain_specific_training_normalizes_each_level_alone():
    data = load_mnist1d(100)
    model = multi_domain.build_model("domain/domain/shared", data, 8, seed=0)
    out = []
    model.head.norm1.register_forward_hook(lambda m, args, y: out.append(y.detach()))
    model.train()
    model(data.train_x[:6])
    per_level = out[0].view(3, 6, 8, -1)
    means = per_level.mean(dim=(1, 3))
    torch.testing.assert_close(means, torch.zeros_like(means), atol=1e-5, rtol=0)


def test_group_norm_verdict_is_inconclusive_when_training_is_not_matched(labels):
    wrong = domain_wrong(**{"GroupNorm": 25.0, "no norm": 40.0})
    losses = {"GroupNorm": 1.2, "no norm": 1.3, "bn": 0.4}
    rows = multi_domain.verdicts(wrong, losses=losses)
    assert rows[3].verdict.label == "inconclusive"
    assert "not matched" in rows[3].verdict.detail
    matched = {"GroupNorm": 0.42, "no norm": 1.3, "bn": 0.4}
    assert multi_domain.verdicts(wrong, losses=matched)[3].verdict.label == "disagrees"


def test_a_sweep_whose_measured_shift_falls_says_so_with_its_numbers():
    """Issue 20, item 7: 2.12 -> 12.21 -> 9.91 was shown without a word."""
    from rethinkbn_studies.studies.multi_domain import shift_order_note

    sweep = {0.0: {"mean_shift": 2.12, "std_ratio": 1.5}, 1.0: {"mean_shift": 12.21,
                                                             "std_ratio": 2.5},
             3.0: {"mean_shift": 9.91, "std_ratio": 8.4}}
    note = shift_order_note(sweep)
    assert "(1 -> 3: 12.21 -> 9.91)" in note and "head's first norm" in note
    assert "1.50, 2.50, 8.40" in note
    sweep[3.0]["mean_shift"] = 13.0
    assert shift_order_note(sweep) == ""
