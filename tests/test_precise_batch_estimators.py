"""Table 2's ablation: the per-batch and pooled estimators, the whole and layer-by-layer passes,
each against a slow reference (torch's own update_bn, the library's PreciseBN, a loop that
estimates one layer at a time), and the ablation's verdicts and computed mechanism sentence."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from rethinkbn.convert import revert_batchnorm
from rethinkbn.population import capture_stats
from rethinkbn_studies.studies import precise_batch
from rethinkbn_studies.studies.precise_batch import (
    DEEP,
    PER_BATCH_LAYERS,
    PER_BATCH_WHOLE,
    POOLED_WHOLE,
    column,
)
from rethinkbn_studies.toolkit import bn
from rethinkbn_studies.toolkit.models import ResNet

# Tiny models on a busy machine: one thread is many times faster.
pytestmark = pytest.mark.usefixtures("one_thread")

N = 41  # a remainder batch for every B below (of a single sample for B=2 and 5)


def ghost_resnet(seed: int = 0) -> nn.Module:
    """A tiny trained-looking 1-D ResNet with ghost BN (NBS 32) and non-trivial running stats."""
    torch.manual_seed(seed)
    model = bn.set_norm_batch_size(ResNet(1, 1, 10, (4, 8), 1), 32)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_mean"):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model


def inputs(seed: int = 1, n: int = N) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # per-sample offsets: the per-batch estimator's variance then visibly misses their spread
    return torch.randn(n, 1, 16, generator=gen) + 2 * torch.randn(n, 1, 1, generator=gen)


def pass_batches(x: torch.Tensor, b: int, seed: int) -> list[torch.Tensor]:
    """The pass batches in PreciseBN's order, computed the obvious way."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [x[idx[i : i + b]] for i in range(0, len(x), b)]


def assert_stats_close(a: dict, b: dict, **tol) -> None:
    assert set(a) == set(b)
    for name in a:
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(a[name][key].double(), b[name][key].double(), **tol,
                                       msg=lambda m, n=name, k=key: f"{n}.{k}: {m}")


@pytest.mark.parametrize("b", [2, 5])
def test_per_batch_whole_is_what_torch_update_bn_installs(b):
    model, x = ghost_resnet(), inputs()
    ours = bn.per_batch_stats(bn.batch_moments(model, x, batch_size=b, num_samples=N, seed=3))
    reference = revert_batchnorm(copy.deepcopy(model))  # torch BatchNorm1d, same state
    torch.optim.swa_utils.update_bn(pass_batches(x, b, 3), reference)
    assert_stats_close(ours, capture_stats(reference), rtol=1e-5, atol=1e-6)


def test_per_batch_whole_of_a_torch_batchnorm_model_is_update_bn():
    model = revert_batchnorm(ghost_resnet())
    x = inputs()
    ours = bn.per_batch_stats(bn.batch_moments(model, x, batch_size=4, num_samples=N, seed=0))
    reference = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(pass_batches(x, 4, 0), reference)
    assert_stats_close(ours, capture_stats(reference), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("b", [2, 10])
def test_pooled_whole_is_the_librarys_precise_bn(b):
    model, x = ghost_resnet(), inputs()
    ours = bn.pooled_stats(bn.batch_moments(model, x, batch_size=b, num_samples=N, seed=3))
    reference = copy.deepcopy(model)
    bn.recompute_population(reference, x, batch_size=b, num_samples=N, seed=3)
    assert_stats_close(ours, capture_stats(reference), rtol=1e-5, atol=1e-6)


def one_layer_at_a_time(exact: nn.Module, x: torch.Tensor, b: int, seed: int) -> dict:
    """The slow layer-by-layer reference: per layer, a copy of the model in eval mode (every
    other layer normalizing with its exact statistics), only that layer in train mode with
    torch's cumulative average (momentum None), run over the pass batches one at a time."""
    out = {}
    for name in capture_stats(exact):
        model = revert_batchnorm(copy.deepcopy(exact)).eval()
        layer = model.get_submodule(name)
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
        with torch.no_grad():
            for batch in pass_batches(x, b, seed):
                model(batch)
        out[name] = {"running_mean": layer.running_mean.clone(),
                     "running_var": layer.running_var.clone()}
    return out


@pytest.mark.parametrize("b", [2, 5])
def test_per_batch_layer_by_layer_matches_estimating_one_layer_at_a_time(b):
    exact, x = ghost_resnet(), inputs()
    bn.recompute_population(exact, x, batch_size=N, num_samples=N, seed=0)
    moments = bn.batch_moments(exact, x, batch_size=b, num_samples=N, seed=2,
                               layer_by_layer=True)
    assert_stats_close(bn.per_batch_stats(moments), one_layer_at_a_time(exact, x, b, 2),
                       rtol=1e-5, atol=1e-6)


def test_pooled_layer_by_layer_is_b_equals_n():
    """Pooling every batch of the layer-by-layer inputs pools the very values B=N pools: the
    same statistics, once the eval-mode layers normalize with B=N's biased variance (the one a
    whole-batch pass normalizes with; the installed one is larger by n / (n - 1), n the values
    per channel)."""
    exact, x = ghost_resnet(), inputs()
    bn.recompute_population(exact, x, batch_size=N, num_samples=N, seed=0)
    counts = bn.batch_moments(exact, x, batch_size=N, num_samples=N, seed=0)
    biased = copy.deepcopy(exact)
    with torch.no_grad():
        for name, m in counts.items():
            n = float(m.count[0, 0])
            biased.get_submodule(name).running_var.mul_((n - 1) / n)
    moments = bn.batch_moments(biased, x, batch_size=2, num_samples=N, seed=5,
                               layer_by_layer=True)
    assert_stats_close(bn.pooled_stats(moments), capture_stats(exact), rtol=1e-5, atol=1e-6)


def test_batch_moments_groups_every_pass_batch_and_leaves_the_model_as_it_was():
    model, x = ghost_resnet(), inputs()
    model.train()
    before = copy.deepcopy(model.state_dict())
    moments = bn.batch_moments(model, x, batch_size=4, num_samples=N, seed=0)
    moments_eval = bn.batch_moments(model, x, batch_size=4, num_samples=N, seed=0,
                                    layer_by_layer=True)
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    for m in (moments, moments_eval):
        stem = m["stem.1"]
        assert stem.count[:, 0].tolist() == [4 * 16] * 10 + [16]  # 10 batches of 4, then 1
    # the first layer's input depends on no normalization: both passes see the same values
    torch.testing.assert_close(moments["stem.1"].mean, moments_eval["stem.1"].mean)


@pytest.mark.parametrize("layer_by_layer", [False, True])
def test_batch_moments_refuses_non_finite_inputs_naming_the_layer(layer_by_layer):
    model, x = ghost_resnet(), inputs()
    x[7, 0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"stem\.1: its input has non-finite values"):
        bn.batch_moments(model, x, batch_size=2, num_samples=N, seed=0,
                         layer_by_layer=layer_by_layer)


@pytest.mark.parametrize(("n", "num_samples"), [(0, N), (N, 0)])
def test_batch_moments_refuses_a_pass_without_samples(n, num_samples):
    model, x = ghost_resnet(), inputs()
    with pytest.raises(ValueError, match="no samples"):
        bn.batch_moments(model, x[:n], batch_size=2, num_samples=num_samples, seed=0)


def test_per_batch_variance_misses_the_spread_of_the_batch_means():
    """The per-batch estimator's bias, on the first layer's input (float64): the average of
    the batches' unbiased variances falls short of the pooled variance by exactly the
    (n/(n-1)-weighted) spread of the batch means, which for B = 2 is about half the variance
    of the per-sample means."""
    model, x = ghost_resnet(), inputs(n=2000)
    moments = bn.batch_moments(model, x, batch_size=2, num_samples=2000, seed=0)["stem.1"]
    per_batch = bn.per_batch_stats({"stem.1": moments})["stem.1"]["running_var"]
    pooled = bn.pooled_stats({"stem.1": moments})["stem.1"]["running_var"]
    k, n = len(moments.mean), moments.count[0]
    between = (moments.mean - moments.mean.mean(0)).square().mean(0)
    torch.testing.assert_close(per_batch, (pooled * (k * n - 1) - k * n * between)
                               / (k * (n - 1)), rtol=1e-9, atol=1e-12)
    samples = bn.batch_moments(model, x, batch_size=1, num_samples=2000, seed=0,
                               layer_by_layer=True)["stem.1"]
    expected = n / (n - 1) * (samples.mean.var(0) / 2 - pooled / n)
    torch.testing.assert_close(pooled - per_batch, expected, rtol=0.15, atol=0)


def test_stats_distances_are_the_precise_bn_reports():
    model, x = ghost_resnet(), inputs()
    old = capture_stats(model)
    report = bn.recompute_population(model, x, batch_size=2, num_samples=N, seed=0)
    distances = bn.stats_distances(model, old)
    for name, layer in report.layers.items():
        shift, ratio, bias = distances[name]
        assert shift == pytest.approx(layer.mean_shift, rel=1e-5)
        assert ratio == pytest.approx(layer.std_log_ratio, rel=1e-5)
        assert abs(bias) <= ratio


def test_stats_distances_sign_says_whether_a_variance_is_too_small():
    model = ghost_resnet()
    stats = capture_stats(model)
    for s in stats.values():
        s["running_var"] = (s["running_var"] + 1e-5) * np.exp(-0.2) - 1e-5
    for shift, ratio, bias in bn.stats_distances(model, stats).values():
        assert shift == 0
        assert ratio == pytest.approx(0.1, rel=1e-5) and bias == pytest.approx(-0.1, rel=1e-5)


# ---------------------------------------------------------------------------- verdicts, note
def ablation_case(rates: dict[str, float], samples: int = 2000, seeds: int = 3):
    """Numbers and per-sample errors for the NBS=32 model, paired draws (one uniform per sample
    and seed: a model with error rate r errs where it is below r)."""
    rngs = [np.random.default_rng(s) for s in range(seeds)]
    shared = [r.random(samples) for r in rngs]
    wrong = {"32": {c: [u < r / 100 for u in shared] for c, r in rates.items()}}
    return {"mean": {"32": dict(rates)}}, wrong


def rates(norm: float, alone: float, both: float, exact: float = 23.5) -> dict[str, float]:
    return {"B=N": exact, column(POOLED_WHOLE, 2): norm, column(PER_BATCH_LAYERS, 2): alone,
            column(PER_BATCH_WHOLE, 2): both}


@pytest.mark.parametrize(("case", "expected"), [
    (rates(23.5, 28.8, 28.8), ["agrees", "agrees", "agrees"]),
    (rates(28.8, 23.6, 23.6), ["disagrees", "disagrees", "disagrees"]),
    # issue 20: the mechanisms are compared only where a B=2 effect is established
    (rates(24.0, 24.0, 24.0), ["inconclusive", "inconclusive", "not testable"]),
])
def test_ablation_verdicts_follow_their_numbers(case, expected, labels):
    rows = precise_batch.ablation_verdicts(*ablation_case(case))
    assert labels(rows) == expected
    assert [r.verdict.outcome for r in rows] == expected
    assert all("McNemar" in r.verdict.detail for r in rows)


def test_the_mechanism_comparison_needs_a_b2_effect_and_says_which_it_lacks():
    numbers, wrong = ablation_case(rates(24.0, 24.0, 24.0))
    verdict = precise_batch.ablation_verdicts(numbers, wrong)[2].verdict
    w = {c: np.stack(v) for c, v in wrong["32"].items()}
    effect = 100 * (w[column(POOLED_WHOLE, 2)].mean() - w["B=N"].mean())
    assert "a B=2 effect to explain" in verdict.precondition
    assert f"pooled / whole (PreciseBN) {effect:+.2f} pt, 95% CI" in verdict.precondition
    assert "per-batch / whole (update_bn) " in verdict.precondition
    assert verdict.detail.startswith("measured, not judged: ")
    # the update_bn effect alone makes the comparison testable (PreciseBN shows none here)
    testable = precise_batch.ablation_verdicts(*ablation_case(rates(23.5, 28.8, 28.8)))[2]
    assert testable.verdict.outcome == "agrees" and not testable.verdict.precondition


@pytest.mark.parametrize(("case", "says"), [
    (rates(23.5, 28.8, 28.8), "The per-batch estimator's bias, not the earlier layers'"),
    (rates(28.8, 23.6, 28.8), "The earlier layers' normalization"),
    (rates(28.8, 28.8, 30.0), "Both mechanisms move"),
    (rates(23.6, 23.6, 23.6), "Neither mechanism moves"),
    (rates(24.0, 23.6, 24.0), "The intervals do not decide"),
])
def test_mechanism_note_is_computed_from_the_intervals(case, says):
    numbers, wrong = ablation_case(case)
    note = precise_batch.mechanism_note(numbers, wrong)
    assert says in note
    w = {c: np.stack(v) for c, v in wrong["32"].items()}
    effect = 100 * (w[column(POOLED_WHOLE, 2)].mean() - w["B=N"].mean())
    assert f"changes by {effect:+.2f} pt, 95% CI" in note and note.count("95% CI [") == 3


@pytest.mark.parametrize(("deep", "says"), [(0.2, "the earlier layers' normalization moves"),
                                            (0.005, "moves them by at most 0.01 sigma")])
def test_mechanism_note_reads_the_per_layer_distances(deep, says):
    numbers, wrong = ablation_case(rates(23.5, 23.5, 23.5))
    numbers["layers_b2"] = {"32": {
        POOLED_WHOLE: {"stem.1": [0.0, 0.0, 0.0], "stages.1.bn2": [deep, 0.01, -0.01]},
        PER_BATCH_LAYERS: {"stem.1": [0.0, 0.02, -0.02], "stages.1.bn2": [0.0, 0.1, -0.1]}}}
    note = precise_batch.mechanism_note(numbers, wrong)
    assert says in note and f"{deep:.3f} sigma" in note
    assert "-11% off B=N's" in note and "-0.100 in stages.1.bn2" in note


# ---------------------------------------------------------------------- deep augmented network
DEEP_MODEL = "deep augmented NBS=32 model (3 blocks per stage)"


def deep_rates(norm: float, alone: float, both: float, b100: float = 23.5) -> dict[str, float]:
    return {**rates(norm, alone, both), "B=100": b100}


def two_depths(shallow: dict[str, float], deep: dict[str, float]):
    """Numbers and per-sample errors for the NBS=32 model and the deep augmented network
    (paired draws, as :func:`ablation_case`)."""
    numbers, wrong = ablation_case(shallow)
    deep_numbers, deep_wrong = ablation_case(deep)
    numbers["mean"][DEEP] = deep_numbers["mean"]["32"]
    wrong[DEEP] = deep_wrong["32"]
    return numbers, wrong


@pytest.mark.parametrize(("deep", "expected"), [
    (deep_rates(28.8, 23.6, 26.0), ["agrees", "agrees", "agrees"]),
    (deep_rates(23.6, 28.8, 28.8), ["disagrees", "agrees", "disagrees"]),
    (deep_rates(28.8, 23.6, 26.0, b100=25.0), ["agrees", "disagrees", "agrees"]),
    (deep_rates(24.0, 24.0, 24.0, b100=23.9), ["inconclusive", "inconclusive", "not testable"]),
])
def test_deep_verdicts_follow_their_numbers(deep, expected, labels):
    rows = precise_batch.deep_verdicts(*two_depths(rates(23.5, 23.5, 23.5), deep))
    assert labels(rows) == expected
    assert all(r.claim.startswith("Deep augmented network (NBS=32, 3 blocks per stage, per-step "
                                  "augmentation)") and "McNemar" in r.verdict.detail for r in rows)
    assert rows[0].ours == f"{deep[column(POOLED_WHOLE, 2)]:.1f} vs 23.5"
    assert [r.paper for r in rows] == ["28.8 vs 23.5", "23.5 vs 23.5", "not in the paper"]
    assert rows[1].ours == f"{deep['B=100']:.1f} vs 23.5"


def test_deep_verdicts_are_absent_without_the_deep_network():
    assert precise_batch.deep_verdicts(*ablation_case(rates(28.8, 23.6, 26.0))) == []


def test_mechanism_note_covers_both_depths():
    numbers, wrong = two_depths(rates(24.0, 23.6, 24.0), rates(28.8, 23.6, 28.8))
    note = precise_batch.mechanism_note(numbers, wrong)
    assert note.count("95% CI [") == 6  # three effects per network
    assert ("The intervals do not decide which mechanism drives the B=2 error in the NBS=32 "
            "model (1 block per stage)") in note
    assert f"not the estimator, drives the B=2 error in the {DEEP_MODEL}" in note
    w = {c: np.stack(v) for c, v in wrong[DEEP].items()}
    deep = 100 * (w[column(POOLED_WHOLE, 2)].mean() - w["B=N"].mean())
    assert (f"ours shows it beyond the margin in the {DEEP_MODEL} ({deep:+.2f} pt); our "
            f"intervals leave it undecided in the NBS=32 model (1 block per stage)") in note
    assert note.index("28.8 vs 23.5") > note.index(f"{DEEP_MODEL} changes by")


def test_mechanism_note_says_where_the_paper_mechanism_does_not_show():
    numbers, wrong = two_depths(rates(23.6, 23.6, 23.6), rates(23.6, 23.6, 23.6))
    note = precise_batch.mechanism_note(numbers, wrong)
    w = {c: np.stack(v) for c, v in wrong["32"].items()}
    effect = 100 * (w[column(POOLED_WHOLE, 2)].mean() - w["B=N"].mean())  # the same draws
    assert (f"ours does not show it beyond the margin in the NBS=32 model (1 block per stage) "
            f"({effect:+.2f} pt) and the {DEEP_MODEL} ({effect:+.2f} pt)") in note


def test_tables_give_the_deep_network_its_table2_row_ablation_rows_and_distances():
    row = {"EMA": 23.7, "B=2": 24.0, "per-batch/whole B=2": 25.0,
           "per-batch/layer-by-layer B=2": 23.6, "B=100": 23.5, "B=N": 23.5}
    deep_row = {k: v for k, v in row.items() if k != "B=100"}
    distance = {"stem.1": [0.0, 0.0, 0.0], "stages.0.bn1": [0.1, 0.2, -0.1]}
    layers = {v: distance for v in (POOLED_WHOLE, PER_BATCH_WHOLE, PER_BATCH_LAYERS)}
    per_seed = {"32": [row], "2": [row], DEEP: [deep_row]}
    scale = precise_batch.Scale(1000, 2000, 40, (16, 32, 64))
    ours, ablation, shallow, deep, pilots = precise_batch._tables(
        per_seed, {"32": layers, "2": layers, DEEP: layers}, scale)
    deep_name = "NBS=32, 3 blocks, augmented"
    assert [r[0] for r in ours.rows] == ["NBS=32", "NBS=2", deep_name]  # Table 2
    assert ours.columns == ["model", "EMA", "B=2", "B=100", "B=N"]
    assert ours.rows[2] == [deep_name, "23.7", "24.0", "-", "23.5"]  # "-": not measured
    assert [r[:2] for r in ablation.rows[-3:]] == [[deep_name, 3]] * 3
    assert ablation.rows[-3][2:] == [precise_batch.VARIANT_NAMES[POOLED_WHOLE], "24.0", "23.5"]
    assert len(shallow.columns) == 7 and "deep" not in shallow.title
    assert "deep augmented network" in deep.title and len(deep.columns) == 4
    assert deep.rows[1] == ["stages.0.bn1", *["0.100 / 0.200 / -0.100"] * 3]
    assert "pilots" in pilots.title and len(pilots.rows) == len(precise_batch.PILOTS)


def test_pilot_table_prints_every_recorded_pilot_run():
    table = precise_batch._pilot_table()
    assert table.columns == ["configuration", "seeds", "B=N", "B=2 - B=N", "B=10 - B=N",
                             "B=100 - B=N"]
    for (name, seeds, exact, diffs), printed in zip(precise_batch.PILOTS, table.rows,
                                                    strict=True):
        assert len(exact) == len(seeds) and all(len(diffs[b]) == len(seeds) for b in diffs)
        assert printed[0] == name and printed[1] == ", ".join(map(str, seeds))
        assert printed[3] == " / ".join(f"{d:+.2f}" for d in diffs[2])


def synthetic_context():
    """A run context over random data (not MNIST-1D: study_data returns it as it is)."""
    from pathlib import Path

    from rethinkbn_studies.contract.base import RunContext
    from rethinkbn_studies.infra.cache import RunCache
    from rethinkbn_studies.toolkit.data import DataSplit

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 1, 16, generator=gen), torch.randint(0, 10, (256,), generator=gen)
    data = DataSplit("synthetic", x, y, x[:64], y[:64], 10)
    return RunContext(quick=True, seeds=(0,), out_dir=Path("."), device=torch.device("cpu"),
                      cache=RunCache(None), progress=lambda it=None, **k: it,
                      dataset=lambda: data, data_spec="synthetic")


def test_the_deep_models_key_is_the_shared_models_plus_its_augmentation():
    from rethinkbn_studies.infra.cache import config_key
    from rethinkbn_studies.toolkit.common import ghost_model_task

    ctx = synthetic_context()
    scale = precise_batch.Scale(256, 64, 2, (4, 8))
    task = precise_batch.deep_model_task(ctx, scale, 1)
    plain = ghost_model_task(ctx, scale, 32, 1, blocks=3)
    assert task.config == {**plain.config, "augment": precise_batch.DEEP_AUGMENT}
    assert config_key(task.config) != config_key(plain.config) and task.args == (scale, 1)


def test_the_deep_model_trains_on_a_fresh_augmentation_at_every_step():
    """The reference: the shared recipe (train.sgd) over batches augmented beforehand, one
    draw per step in step order from the seed's generator; every view of a sample differs."""
    from rethinkbn_studies.studies.domain_shift import augment
    from rethinkbn_studies.toolkit.common import GHOST_LR, GHOST_SGD_BATCH, ghost_model, new_model
    from rethinkbn_studies.toolkit.train import TrainConfig, sgd, shuffled_batches

    ctx, seed = synthetic_context(), 3
    scale = precise_batch.Scale(256, 64, 2, (4, 8))
    data = ctx.dataset()
    trained = ghost_model(ctx, scale, 32, seed, precise_batch._train_deep_model(ctx, scale, seed),
                          blocks=3)
    order, gen = shuffled_batches(256, GHOST_SGD_BATCH, seed), torch.Generator().manual_seed(seed)
    steps = [(idx, augment(data.train_x[idx], gen)) for epoch in range(2) for idx in order(epoch)]
    views = {}
    for idx, xb in steps:
        for i, v in zip(idx.tolist(), xb, strict=True):
            views.setdefault(i, []).append(v)
    assert all(len(v) == 2 and not torch.equal(*v) for v in views.values())
    reference = bn.set_norm_batch_size(new_model(ctx, data, scale, seed, 3), 32)
    loss = nn.CrossEntropyLoss()
    sgd(reference, TrainConfig(epochs=2, batch_size=GHOST_SGD_BATCH, lr=GHOST_LR),
        lambda epoch: steps[2 * epoch: 2 * epoch + 2],
        lambda m, step: loss(m(step[1]), data.train_y[step[0]]), steps_per_epoch=2)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("b", [2, 10, 20])
def test_the_deep_networks_precise_bn_column_is_the_librarys(b):
    """The deep network's pooled/whole statistics come from the moments of the per-batch
    estimator's own pass; they are the library's PreciseBN, and the other variants are the same
    either way."""
    exact, x = ghost_resnet(), inputs()
    bn.recompute_population(exact, x, batch_size=N, num_samples=N, seed=0)
    fast = precise_batch._variant_stats(exact, x, b, 3, library=False)
    slow = precise_batch._variant_stats(exact, x, b, 3, library=True)
    # outside the ablation's batch sizes (B=20 here, B=100 in the study): PreciseBN alone
    variants = ([POOLED_WHOLE, PER_BATCH_WHOLE, PER_BATCH_LAYERS]
                if b in precise_batch.ABLATION_BATCHES else [POOLED_WHOLE])
    assert list(fast) == list(slow) == variants
    for variant in fast:
        assert_stats_close(fast[variant], slow[variant], rtol=1e-5, atol=1e-6)
