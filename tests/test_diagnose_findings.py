"""`diagnose` never gives a verdict about a NaN or about no data, and says what it could not
test: NaN/Inf measurements and metrics are problems of their own, a pass that saw no samples
raises, a model's shuffle is part of its training behaviour, a model without running statistics
gets "not testable", a metric that is not a number is named."""

import copy
import math
import re

import pytest
import torch
from torch import nn

from rethinkbn import (
    GhostBatchNorm,
    ShuffledModule,
    convert_batchnorm,
    diagnose,
    virtual_devices,
)
from rethinkbn.distributed import ShufflePlan
from test_diagnose import TRAIN, VAL, accuracy, batches, conv_net, fit, run


@pytest.fixture(scope="module")
def healthy():
    torch.manual_seed(0)
    return fit(conv_net(), *TRAIN, batch=32, lr=0.1, epochs=2)


def by_check(d, check):
    return [f for f in d.findings if f.check == check]


def no_ok_about_nan(d):
    for f in d.findings:
        if f.severity == "ok":
            assert math.isfinite(f.value) and "nan" not in f.message.lower(), f


# ------------------------------------------------------------------ NaN and Inf
@pytest.mark.parametrize("metric", [None, accuracy])
@pytest.mark.parametrize("buffer, value", [("running_mean", math.nan),
                                           ("running_var", math.inf)])
def test_non_finite_ema_buffers_are_a_problem_naming_layer_and_buffer(healthy, metric, buffer,
                                                                      value):
    model = copy.deepcopy(healthy)
    with torch.no_grad():
        getattr(model[1], buffer)[2] = value
    d = run(model, metric=metric, num_samples=128)
    found = by_check(d, "non-finite:ema")
    assert [(f.layer, f.severity) for f in found] == [("1", "problem")], d.summary()
    assert f"{buffer} holds 1 of 8" in found[0].message
    assert [f.severity for f in by_check(d, "ema") if f.layer is None] == ["problem"]
    no_ok_about_nan(d)
    assert torch.isnan(model[1].running_mean[2]) == math.isnan(value)  # left as it was


def test_a_metric_that_is_nan_on_some_batches_is_a_problem_not_ok(healthy):
    calls = []

    def sometimes_nan(out, batch):
        calls.append(1)
        return math.nan if len(calls) % 3 == 0 else float(accuracy(out, batch))

    d = run(healthy, metric=sometimes_nan, num_samples=128)
    found = by_check(d, "non-finite:metric")
    assert found and all(f.severity == "problem" and f.layer is None for f in found)
    assert any("of 2 batches" in f.message for f in found), d.summary()
    no_ok_about_nan(d)
    assert "+nan" not in d.summary()


def test_a_metric_that_is_always_nan_gives_no_ok_metric_verdict(healthy):
    d = run(healthy, metric=lambda out, b: torch.tensor(math.nan), num_samples=128)
    assert {f.check for f in d.findings if f.severity == "problem"} >= {"non-finite:metric"}
    no_ok_about_nan(d)


def test_a_non_finite_train_test_gap_is_a_problem(healthy):
    model = copy.deepcopy(healthy)
    with torch.no_grad():
        model[4].weight[0] = math.inf  # the last BN's output is Inf (its inputs stay finite)
    d = run(model, val=None, metric=None, num_samples=128)
    assert [f.layer for f in by_check(d, "non-finite:train-test")] == ["4", None], d.summary()
    assert [f.severity for f in by_check(d, "train-test") if f.layer is None] == ["problem"]
    no_ok_about_nan(d)


def test_non_finite_frozen_statistics_are_a_problem_everywhere(healthy):
    model = convert_batchnorm(copy.deepcopy(healthy), "frozen", include=["4"])
    with torch.no_grad():
        model[4].running_mean[0] = math.nan  # the last BN: the layers before it see no NaN
    d = run(model, num_samples=128)
    assert [f.severity for f in by_check(d, "smell:frozen-stats")] == ["problem"]
    assert [f.layer for f in by_check(d, "non-finite:ema")] == ["4"]
    assert by_check(d, "non-finite:train-test")  # the model's outputs are NaN in training
    no_ok_about_nan(d)


# ------------------------------------------------------------------ metrics that are not numbers
@pytest.mark.parametrize("value, said", [(torch.ones(4), "shape (4,)"), (None, "None"),
                                         ("high", "a str")])
def test_a_metric_that_is_not_a_number_is_named(healthy, value, said):
    def my_metric(out, batch):
        return value

    with pytest.raises(TypeError, match=rf"metric .*my_metric returned .*{re.escape(said)}"):
        run(healthy, metric=my_metric, num_samples=64)


# ------------------------------------------------------------------ no data
class OneShot(torch.utils.data.IterableDataset):
    """A stream: its batches can be read once; a second iteration yields nothing."""

    def __init__(self, items):
        self.items = iter(items)

    def __iter__(self):
        return self.items


def stream(x, y, size):
    return torch.utils.data.DataLoader(OneShot(batches(x, y, size)), batch_size=None)


@pytest.mark.parametrize("which", ["train_data", "eval_data"])
def test_a_stream_whose_second_iteration_is_empty_raises(healthy, which):
    train = stream(*TRAIN, 32) if which == "train_data" else batches(*TRAIN, 32)
    val = stream(*VAL, 32) if which == "eval_data" else batches(*VAL, 32)
    with pytest.raises(ValueError, match=rf"comparison pass over {which} saw 0 samples"):
        # the statistics pass reads the whole stream (384 samples); the comparisons see nothing
        diagnose(healthy, train, val, metric=accuracy, num_samples=384, progress=False)


def test_batches_too_small_for_training_behaviour_raise(healthy):
    ones = [(x[:1], y[:1]) for x, y in batches(*TRAIN, 32)]
    with pytest.raises(ValueError, match="fewer than 2 samples"):
        diagnose(healthy, ones, num_samples=16, progress=False)


# ------------------------------------------------------------------ without running statistics
def test_a_model_without_running_statistics_is_not_testable_for_ema():
    torch.manual_seed(0)
    model = conv_net()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
            m.num_batches_tracked = None
    d = run(model.eval(), num_samples=128)
    ema = by_check(d, "ema")
    assert [f.severity for f in ema] == ["skipped"], d.summary()
    assert "not testable" in ema[0].message and "track_running_stats" in ema[0].message
    assert d.batch_size == 32 and [r.norm_batch_size for r in d.layers.values()] == [32, 32]
    assert "NBS 0" not in d.summary() and d.num_samples > 0


def test_without_a_metric_the_metric_checks_are_said_to_be_skipped(healthy):
    d = run(healthy, val=None, metric=None, num_samples=64)
    assert [f.severity for f in by_check(d, "metric")] == ["skipped"]
    assert "no metric given" in d.summary()
    assert not [f for f in d.problems if f.check == "metric"]
    assert not by_check(run(healthy, num_samples=64), "metric")


# ------------------------------------------------------------------ a model that shuffles
def shuffled_head(seed=0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -2.0, 1.5]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    return ShuffledModule(virtual_devices(nn.Sequential(bn), 2), num_devices=2, seed=7)


def correlated_data():
    """Batches of 8 whose two virtual devices hold one group each, 3 sigma apart."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(6):
        x = torch.randn(8, 3, 5, generator=g)
        x[:4] += 3
        out.append((x, torch.tensor([0] * 4 + [1] * 4)))
    return out


def test_training_behaviour_is_measured_with_the_models_shuffle():
    model = shuffled_head().train()
    data = correlated_data()
    d = diagnose(model, data, num_samples=48, progress=False)  # comparisons on 3 batches
    x_all = torch.cat([x for x, _ in data]).double()
    mu = x_all.mean((0, 2))
    var = x_all.var((0, 2), unbiased=False) * x_all[:, 0].numel() / (x_all[:, 0].numel() - 1)
    sq, n = 0.0, 0
    for x, _ in data[:3]:
        plan = ShufflePlan.virtual(8, 2, seed=7, step=0)
        for dev in plan.shuffle(x.double()).split(4):
            z_dev = (dev - dev.mean((0, 2), keepdim=True)) / (
                dev.var((0, 2), unbiased=False, keepdim=True) + 1e-5).sqrt()
            z_pop = (dev - mu[:, None]) / (var[:, None] + 1e-5).sqrt()
            sq += float((z_dev - z_pop).square().sum())
            n += z_dev.numel()
    row = d.layers["inner.0"]
    assert row.train_test_gap == pytest.approx(math.sqrt(sq / n), rel=1e-4)
    assert "ShuffledModule '<model>'" in row.nbs_rule and model.step == 0


def test_a_model_that_shuffles_is_not_told_to_shuffle():
    model = shuffled_head().train()
    d = diagnose(model, correlated_data(), num_samples=48, progress=False,
                 group_ids=lambda b: b[1])
    smell = by_check(d, "smell:correlated-batch")
    assert [f.severity for f in smell] == ["skipped"], d.summary()
    assert "ShuffledModule" not in " ".join(f.recommendation for f in d.findings)
    # the same head without its shuffle is told
    bare = diagnose(shuffled_head().inner.train(), correlated_data(), num_samples=48,
                    progress=False, group_ids=lambda b: b[1])
    assert [f.severity for f in by_check(bare, "smell:correlated-batch")] == ["problem"]


# ------------------------------------------------------------------ empty batches
@pytest.mark.parametrize("layer", ["torch", "ghost"])
def test_an_empty_first_batch_is_not_the_training_batch(layer):
    # before: the empty batch was taken as the per-device batch, NBS 0, and the verdict on it
    # divided by zero
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3) if layer == "torch" else GhostBatchNorm(3, norm_batch_size=4)
    data = [torch.randn(384, 3, 5)[i:i + 32] for i in range(0, 384, 32)]
    d = diagnose(nn.Sequential(bn).eval(), [data[0][:0], *data], num_samples=128,
                 progress=False)
    assert d.batch_size == 32
    assert d.layers["0"].norm_batch_size == (32 if layer == "torch" else 4)
    assert d.layers["0"].values_per_channel == d.layers["0"].norm_batch_size * 5
