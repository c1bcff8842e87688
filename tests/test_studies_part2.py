"""Studies of Sec. 5-6 (domain-shift, multi-domain, leakage): end to end; verdicts from numbers."""

import json
import shutil

import numpy as np
import pytest
import torch

from rethinkbn.layers import GhostBatchNorm
from rethinkbn.population import batch_stats_inference
from rethinkbn_studies.infra.harness import reproduce
from rethinkbn_studies.studies import domain_shift, leakage, multi_domain
from rethinkbn_studies.toolkit.data import load_mnist1d
from rethinkbn_studies.toolkit.roi import RoiBatch, RoiImages, RoiTaskConfig

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


def errs(rate, n=200, seeds=3, shift=0):
    """(seeds, n) 0/1 errors: the first ``rate`` % of the samples (rotated by ``shift``) wrong.
    Nested sets (shift 0) give a narrow paired interval; ``n`` small and shifted sets a wide
    one."""
    row = np.zeros(n, dtype=bool)
    row[: int(round(rate / 100 * n))] = True
    return np.tile(np.roll(row, shift), (seeds, 1))


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
    import copy
    from itertools import islice

    variant = leakage.VARIANTS[name]
    model = leakage.build_model(variant, TINY, seed=0)
    train, _, _ = leakage.task_images(TINY, seed=0)
    batches = list(islice(leakage.step_batches(train, TINY, seed=7, epoch=0),
                          TINY.precise_batches))
    reference = _inputs_in_training(copy.deepcopy(model), batches)
    leakage.population_stats(model, variant, train, TINY, seed=0)
    norms = [m for m in model.modules() if isinstance(m, GhostBatchNorm)]
    for layer, x in zip(norms, reference, strict=True):
        torch.testing.assert_close(layer.running_mean.double(), x.mean(0), rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(layer.running_var.double(), x.var(0), rtol=1e-4, atol=1e-6)


def test_whole_step_normalization_would_give_other_statistics():
    """The test above is not vacuous: normalizing the whole step at once changes layer 2."""
    import copy
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


def test_domain_shift_contrast_stats_verdict_is_inconclusive_within_the_noise(labels):
    shifted, clean = shift_errors()
    clean["contrast"] = errs(10, shift=100)
    assert labels(domain_shift.verdicts(shifted, clean))[3] == "inconclusive"


def test_group_norm_verdict_is_inconclusive_when_training_is_not_matched(labels):
    wrong = domain_wrong(**{"GroupNorm": 25.0, "no norm": 40.0})
    losses = {"GroupNorm": 1.2, "no norm": 1.3, "bn": 0.4}
    rows = multi_domain.verdicts(wrong, losses=losses)
    assert rows[3].verdict.label == "inconclusive"
    assert "not matched" in rows[3].verdict.detail
    matched = {"GroupNorm": 0.42, "no norm": 1.3, "bn": 0.4}
    assert multi_domain.verdicts(wrong, losses=matched)[3].verdict.label == "disagrees"
