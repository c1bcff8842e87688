"""Sec. 5.1, Table 4 (domain-shift): the verdicts follow from the numbers; test-time EMA and
augmentation."""


import pytest
import torch

from rethinkbn_studies.studies import domain_shift
from study_cases import errs


# ---------------------------------------------------------------------------- domain-shift
def shift_errors(**rates):
    base = {n: (40, 30) for n in
            ("gaussian_noise", "contrast", "brightness", "blur", "quantization")}
    shifted = {n: {"source": errs(a), "target": errs(b)} for n, (a, b) in {**base,
                                                                          **rates}.items()}
    clean = {domain_shift.TRAIN_STATS: errs(10), domain_shift.CLEAN_STATS: errs(10.2),
             "contrast": errs(30)}
    return shifted, clean


def test_domain_shift_verdicts_agree_on_paper_like_numbers(labels):
    assert labels(domain_shift.verdicts(*shift_errors())) == ["agrees"] * 4


@pytest.mark.parametrize("contrast, outcome", [((30, 40), "disagrees"), ((30, 30),
                                                                        "inconclusive")])
def test_domain_shift_verdict_follows_the_contrast_gain(labels, contrast, outcome):
    shifted, clean = shift_errors(contrast=contrast)
    assert labels(domain_shift.verdicts(shifted, clean))[0] == outcome


@pytest.mark.parametrize("rates, outcome", [
    ({"blur": (30, 40), "quantization": (30, 40)}, "disagrees"),
    ({"blur": (30, 30), "quantization": (30, 40)}, "inconclusive"),  # 1 yes, 1 open, 1 no
])
def test_non_affine_majority_has_three_outcomes(labels, rates, outcome):
    assert labels(domain_shift.verdicts(*shift_errors(**rates)))[1] == outcome


@pytest.mark.parametrize("unaug, shift, outcome", [(16, 0, "disagrees"),
                                                   (10.6, 150, "inconclusive")])
def test_domain_shift_clean_equivalence_has_three_outcomes(labels, unaug, shift, outcome):
    shifted, clean = shift_errors()
    clean[domain_shift.CLEAN_STATS] = errs(unaug, shift=shift)
    assert labels(domain_shift.verdicts(shifted, clean))[2] == outcome


def test_domain_shift_clean_verdict_flips_when_contrast_stats_are_harmless(labels):
    shifted, clean = shift_errors()
    clean["contrast"] = errs(8)
    assert labels(domain_shift.verdicts(shifted, clean))[3] == "disagrees"


def test_ema_on_the_test_stream_adapts_in_place_and_leaves_the_model_alone():
    """Reference: a loop that updates each BN's running stats by hand, then predicts."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), torch.nn.BatchNorm1d(4),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6, 3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(10, 1, 8) * 3 + 1, torch.randint(0, 3, (10,))
    wrong = domain_shift.ema_on_stream(model, x, y, momentum=0.5, batch_size=4)
    mean, var = model[1].running_mean.clone(), model[1].running_var.clone()
    expected = []
    for i in range(0, 10, 4):
        h = model[0](x[i:i + 4])
        mean = 0.5 * mean + 0.5 * h.mean((0, 2))
        var = 0.5 * var + 0.5 * h.var((0, 2), unbiased=True)
        z = (h - mean[None, :, None]) / (var[None, :, None] + model[1].eps).sqrt()
        z = z * model[1].weight[None, :, None] + model[1].bias[None, :, None]
        expected.append(model[3](z.flatten(1)).argmax(1) != y[i:i + 4])
    assert torch.equal(wrong, torch.cat(expected))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_verdict_combinations_have_three_outcomes():
    from rethinkbn_studies.contract.verdicts import Interval, all_hold, exceeds, majority_hold

    yes = exceeds("a", Interval(2.0, 1.0, 3.0, 0.95, "t"))
    no = exceeds("b", Interval(-2.0, -3.0, -1.0, 0.95, "t"))
    maybe = exceeds("c", Interval(0.5, -1.0, 2.0, 0.95, "t"))
    assert [all_hold("all", p).label for p in ([yes, yes], [yes, no], [yes, maybe])] == [
        "agrees", "disagrees", "inconclusive"]
    assert [majority_hold("most", p).label for p in ([yes, yes, no], [yes, no, no],
                                                     [yes, maybe, no])] == [
        "agrees", "disagrees", "inconclusive"]
    assert majority_hold("most", [yes, maybe, no]).interval == (1.0, 2.0)


def test_augment_shifts_and_scales_each_sample_within_its_bounds():
    x = torch.randn(6, 1, 40, dtype=torch.float64)
    y = domain_shift.augment(x, torch.Generator().manual_seed(0))
    for row, out in zip(x, y, strict=True):
        fits = []
        for s in range(-domain_shift.MAX_SHIFT, domain_shift.MAX_SHIFT + 1):
            rolled = row.roll(s, dims=-1)
            gain = float((out * rolled).sum() / (rolled * rolled).sum())
            fits.append(0.8 <= gain <= 1.2 and torch.allclose(out, gain * rolled))
        assert any(fits)


def test_domain_shift_contrast_stats_verdict_is_inconclusive_within_the_noise(labels):
    shifted, clean = shift_errors()
    clean["contrast"] = errs(10, shift=100)
    assert labels(domain_shift.verdicts(shifted, clean))[3] == "inconclusive"
