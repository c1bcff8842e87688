"""Sec. 6, Tables 3 and 6 (leakage): the verdicts follow from the numbers; per-device BN,
ranks, population statistics as in training."""

import copy

import numpy as np
import pytest
import torch

from rethinkbn.layers import GhostBatchNorm
from rethinkbn.population import batch_stats_inference
from rethinkbn_studies.studies import (
    leakage,
    multi_domain,
)
from rethinkbn_studies.toolkit.data import load_mnist1d
from rethinkbn_studies.toolkit.roi import RoiBatch, RoiImages, RoiTaskConfig
from study_cases import errs

# ---------------------------------------------------------------------------- leakage
LEAK_RATES = {"bn-1img": (30, 12), "bn-2img": (15, 14), "bn-shuffle-1img": (13.5, 20),
              "bn-shuffle-2img": (13, 22), "syncbn": (13, 28), "no-norm": (18, 18),
              "groupnorm": (17, 17)}


def leak_wrong(**rates):
    return {n: {"pop": errs(p), "mu_B": errs(m)}
            for n, (p, m) in {**LEAK_RATES, **rates}.items()}


def test_leakage_verdicts_agree_on_paper_like_numbers(labels):
    assert labels(leakage.verdicts(leak_wrong())) == ["agrees"] * 5


@pytest.mark.parametrize("rates, outcome", [((12, 20), "disagrees"),
                                            ((12, 12), "inconclusive")])
def test_leakage_verdict_flips_without_a_leak(labels, rates, outcome):
    assert labels(leakage.verdicts(leak_wrong(**{"bn-1img": rates})))[0] == outcome


def test_leakage_verdict_is_inconclusive_on_too_few_rois(labels):
    wrong = {n: {"pop": errs(p, n=40, shift=5), "mu_B": errs(m, n=40)}
             for n, (p, m) in LEAK_RATES.items()}
    wrong["bn-1img"] = {"pop": errs(20, n=40, shift=7), "mu_B": errs(15, n=40)}
    assert labels(leakage.verdicts(wrong))[0] == "inconclusive"


def test_leakage_verdict_flips_when_shuffle_does_not_help(labels):
    wrong = leak_wrong(**{"bn-shuffle-1img": (36, 20)})
    assert labels(leakage.verdicts(wrong))[2:4] == ["disagrees", "disagrees"]


def test_shuffle_equivalence_is_inconclusive_near_its_margin(labels):
    wrong = leak_wrong(**{"bn-shuffle-1img": (15, 20)})  # 2.0 pt from SyncBN: on the margin
    wrong["syncbn"]["pop"] = errs(13, shift=700)
    assert labels(leakage.verdicts(wrong))[3] == "inconclusive"


@pytest.mark.parametrize("sync, outcome", [(13, "agrees"), (24, "disagrees"),
                                           (17.8, "inconclusive")])
def test_syncbn_non_inferiority_has_three_outcomes(labels, sync, outcome):
    wrong = leak_wrong(**{"syncbn": (sync, 28)})
    if outcome == "inconclusive":
        wrong["syncbn"]["pop"] = errs(sync, shift=500)
    assert labels(leakage.verdicts(wrong))[4] == outcome


@pytest.mark.parametrize("co, outcome", [((25, 12), "agrees"), ((12, 25), "disagrees"),
                                         ((12, 12), "inconclusive")])
def test_ablation_verdict_asks_for_a_leak_without_the_nuisance(labels, co, outcome):
    ablation = {"co-occurrence only": {"pop": errs(co[0]), "mu_B": errs(co[1])},
                "illumination only": {"pop": errs(30), "mu_B": errs(10)}}
    rows = leakage.verdicts(leak_wrong(), ablation)
    assert len(rows) == 6 and rows[5].verdict.label == outcome
    assert "co-occurrence only" in leakage.ablation_note(leak_wrong(), ablation)


@pytest.mark.parametrize("real_pop, shift, outcome", [(13, 0, "agrees"), (20, 0, "disagrees"),
                                                      (14.6, 900, "inconclusive")])
def test_ranks_row_is_an_equivalence_of_real_and_virtual_errors(labels, real_pop, shift,
                                                                 outcome):
    wrong = leak_wrong()
    real = {"syncbn": {"pop": errs(real_pop, shift=shift), "mu_B": errs(28)},
            "bn-1img": {"pop": errs(30), "mu_B": errs(12)}}
    rows = leakage.verdicts(wrong, ranks=(2, real))
    assert len(rows) == 6 and rows[-1].verdict.label == outcome
    assert rows[-1].verdict.interval is not None and rows[-1].verdict.test


TINY = leakage.LeakageScale(num_train_images=16, num_test_images=4, epochs=1, precise_batches=2,
                            task=RoiTaskConfig(rois_per_image=4))


def test_per_device_bn_groups_the_rois_of_one_device():
    for name, images in (("bn-1img", 1), ("bn-2img", 2)):
        model = leakage.build_model(leakage.VARIANTS[name], TINY, seed=0)
        norms = [m for m in model.modules() if isinstance(m, GhostBatchNorm)]
        assert len(norms) == 2
        assert all(m.norm_batch_size == images * 4 for m in norms)


def test_ranks_share_a_step_exactly():
    train, _, _ = leakage.task_images(TINY, seed=0)
    whole = list(leakage.step_batches(train, TINY, seed=0, epoch=0))
    halves = [list(leakage.step_batches(train, TINY, seed=0, epoch=0, rank=r, world=2))
              for r in range(2)]
    for (x, rois), (x0, r0), (x1, r1) in zip(whole, *halves, strict=True):
        assert torch.equal(torch.cat([x0, x1]), x)
        assert torch.equal(torch.cat([r0.image, r1.image + len(x0)]), rois.image)
        assert torch.equal(torch.cat([r0.labels, r1.labels]), rois.labels)


def test_mini_batch_evaluation_uses_each_image_alone():
    """mu_B of one image does not depend on the other test images evaluated beside it."""
    model = leakage.build_model(leakage.VARIANTS["syncbn"], TINY, seed=0)
    _, test, rois = leakage.task_images(TINY, seed=0)
    first = RoiBatch(rois.image[:4], rois.starts[:4], rois.labels[:4])
    sub = RoiImages(test.images[:1], test.starts[:1], test.labels[:1])
    with batch_stats_inference(model, norm_batch_size=4), torch.no_grad():
        alone = model(sub.images, first)
        together = model(test.images, rois)[:4]
    torch.testing.assert_close(alone, together)


def test_level_shift_matches_pooling_the_levels_by_hand():
    data = load_mnist1d(100)
    model = multi_domain.build_model("shared/domain/shared", data, 8, seed=0)
    g = torch.Generator().manual_seed(0)
    values = []
    for layer in (model.head.norm1, model.head.norm2):
        layer.running_mean.copy_(torch.randn(3, 8, generator=g))
        layer.running_var.copy_(torch.rand(3, 8, generator=g) + 0.5)
        for c in range(8):
            means = [float(layer.running_mean[d, c]) for d in range(3)]
            varis = [float(layer.running_var[d, c]) for d in range(3)]
            mu = sum(means) / 3
            var = sum(v + (m - mu) ** 2 for m, v in zip(means, varis, strict=True)) / 3
            values += [abs(m - mu) / var**0.5 for m in means]
    assert abs(multi_domain.level_shift(model) - sum(values) / len(values)) < 1e-9


def test_level_shift_is_none_without_per_level_population_stats():
    data = load_mnist1d(100)
    model = multi_domain.build_model("domain/shared/shared", data, 8, seed=0)
    assert multi_domain.level_shift(model) is None


@pytest.mark.parametrize("ranks", [3, 8])
def test_ranks_that_do_not_split_a_step_into_devices_are_refused(ranks):
    scale = leakage.LeakageScale(num_train_images=16, num_test_images=4, epochs=1)
    with pytest.raises(ValueError, match=rf"--ranks {ranks} .* expected one of \[1, 2, 4\]"):
        leakage.check_ranks(scale, ranks)


def test_train_on_ranks_refuses_ranks_that_split_a_device_before_starting_torchrun():
    # 8 images per step on 8 ranks: one image per rank, but a device of bn-2img holds two.
    scale = leakage.LeakageScale(num_train_images=16, num_test_images=4, epochs=1)
    with pytest.raises(ValueError, match=r"--ranks 8 .* devices of 2 images .* \[1, 2, 4\]"):
        leakage.train_on_ranks("bn-2img", scale, seed=0, ranks=8, timeout_s=1.0)


def _inputs_in_training(model, batches):
    """Every head BN layer's inputs over ``batches`` in a training forward (float64)."""
    norms = [m for m in model.modules() if isinstance(m, GhostBatchNorm)]
    seen = {id(m): [] for m in norms}
    hooks = [m.register_forward_pre_hook(lambda m, args: seen[id(m)].append(args[0].double()))
             for m in norms]
    model.train()
    try:
        with torch.no_grad():
            for x, rois in batches:
                model(x, rois)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(seen[id(m)]) for m in norms]


@pytest.mark.parametrize("name", ["bn-1img", "bn-2img", "syncbn"])
def test_population_stats_are_those_of_the_inputs_normalized_as_in_training(name):
    """precise_bn's statistics of the second head layer are the moments of its inputs when the
    first layer normalizes each device alone (per-device BN), as in training."""
    from itertools import islice

    variant = leakage.VARIANTS[name]
    model = leakage.build_model(variant, TINY, seed=0)
    train, _, _ = leakage.task_images(TINY, seed=0)
    batches = list(islice(leakage.step_batches(train, TINY, seed=7, epoch=0),
                          TINY.precise_batches))
    reference = _inputs_in_training(copy.deepcopy(model), batches)
    leakage.recompute_roi_population(model, variant, train, TINY, seed=0)
    norms = [m for m in model.modules() if isinstance(m, GhostBatchNorm)]
    for layer, x in zip(norms, reference, strict=True):
        torch.testing.assert_close(layer.running_mean.double(), x.mean(0), rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(layer.running_var.double(), x.var(0), rtol=1e-4, atol=1e-6)


def test_whole_step_normalization_would_give_other_statistics():
    """The test above is not vacuous: normalizing the whole step at once changes layer 2."""
    from itertools import islice

    model = leakage.build_model(leakage.VARIANTS["bn-1img"], TINY, seed=0)
    train, _, _ = leakage.task_images(TINY, seed=0)
    batches = list(islice(leakage.step_batches(train, TINY, seed=7, epoch=0),
                          TINY.precise_batches))
    per_device = _inputs_in_training(copy.deepcopy(model), batches)[1]
    whole = copy.deepcopy(model)
    for m in whole.modules():
        if isinstance(m, GhostBatchNorm):
            m.norm_batch_size = None
    assert not torch.allclose(_inputs_in_training(whole, batches)[1].mean(0),
                              per_device.mean(0), atol=1e-3)


def test_leakage_bootstrap_draws_images_not_rois():
    """Per-RoI errors become each image's error fraction (RoIs of an image are contiguous)."""
    wrong = {"v": {"pop": np.array([[1, 1, 0, 0, 0, 1], [0, 0, 0, 1, 1, 1]], dtype=bool)}}
    out = leakage.per_image(wrong, rois_per_image=3)
    np.testing.assert_allclose(out["v"]["pop"], [[2 / 3, 1 / 3], [0.0, 1.0]])


@pytest.mark.parametrize("two_img, outcome", [((40, 12), "disagrees"), ((22, 12),
                                                                        "inconclusive")])
def test_two_images_per_device_verdict_has_three_outcomes(labels, two_img, outcome):
    wrong = leak_wrong(**{"bn-2img": two_img})
    if outcome == "inconclusive":  # the same gap of 18 pt, with other RoIs: only noise
        wrong["bn-1img"] = {"pop": errs(30, shift=50), "mu_B": errs(12)}
        wrong["bn-2img"] = {"pop": errs(30, shift=120), "mu_B": errs(12, shift=60)}
    assert labels(leakage.verdicts(wrong))[1] == outcome
