"""precise_bn against float64 references computed from the captured BatchNorm inputs."""

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rethinkbn.population import precise_bn
from rethinkbn.population._state import batchnorm_layers


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(4, 5, 3, stride=2), nn.BatchNorm2d(5, momentum=None), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 3 * 3, 6), nn.BatchNorm1d(6),
    )


def batches(sizes, shape=(3, 8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=g) * 2 + 0.5 for n in sizes]


def captured_inputs(model, data):
    """Every input of every BatchNorm during a train-mode-BN, eval-elsewhere pass (float64)."""
    model = copy.deepcopy(model).eval()
    seen = {name: [] for name, _ in batchnorm_layers(model)}
    for name, bn in batchnorm_layers(model):
        bn.train()
        bn.register_forward_pre_hook(lambda m, a, name=name: seen[name].append(a[0].double()))
    with torch.no_grad():
        for x in data:
            model(x)
    return seen


def pooled(xs, correction):
    """Per-channel mean and variance of the concatenation of every element of ``xs``."""
    flat = torch.cat([x.transpose(0, 1).reshape(x.size(1), -1) for x in xs], dim=1)
    return flat.mean(1), flat.var(1, correction=correction)


def model_state(model):
    """Everything precise_bn might touch: state_dict values, momenta, modes, hooks, observers."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "momenta": [getattr(m, "momentum", None) for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "attrs": [sorted(vars(m)) for m in model.modules()],
        "observers": [getattr(m, "observer", None) for m in model.modules()],
    }


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a.keys() - {"state"}:
        assert a[key] == b[key], key
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


def test_installs_pooled_mean_and_unbiased_variance_of_all_captured_activations():
    model, data = small_cnn(), batches([7, 16, 5, 9])
    seen = captured_inputs(model, data)
    precise_bn(model, data, num_batches=4)
    for name, bn in batchnorm_layers(model):
        mean, var = pooled(seen[name], correction=1)
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_one_batch_installs_what_batchnorm_with_momentum_one_would():
    model, (x,) = small_cnn(), batches([12])
    reference = copy.deepcopy(model).eval()
    for _, bn in batchnorm_layers(reference):
        bn.train()
        bn.momentum = 1.0
    with torch.no_grad():
        reference(x)
    precise_bn(model, [x], num_batches=1)
    for (_, bn), (_, ref) in zip(
        batchnorm_layers(model), batchnorm_layers(reference), strict=True
    ):
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-6, atol=1e-7)


def fvcore_style_estimate(xs):
    """The paper's / fvcore's estimator on equal batches.

    mu = E[mu_B], var = E[mu_B^2 + sigma_B^2] - mu^2 (sigma_B^2 biased).
    """
    means = torch.stack([x.transpose(0, 1).reshape(x.size(1), -1).mean(1) for x in xs])
    variances = torch.stack(
        [x.transpose(0, 1).reshape(x.size(1), -1).var(1, correction=0) for x in xs]
    )
    mu = means.mean(0)
    return mu, (means.square() + variances).mean(0) - mu.square()


def test_equals_the_fvcore_style_estimator_on_equal_batches():
    model, data = small_cnn(), batches([8] * 5)
    seen = captured_inputs(model, data)
    precise_bn(model, data, num_batches=5)
    for name, bn in batchnorm_layers(model):
        mu, var = fvcore_style_estimate(seen[name])
        n = sum(x.numel() // x.size(1) for x in seen[name])
        torch.testing.assert_close(bn.running_mean.double(), mu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double() * (n - 1) / n, var, rtol=1e-5, atol=1e-6)


def test_batches_of_two_are_exact_where_averaged_batch_variances_are_biased():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    data = [torch.randn(2, 3) * 3 + 1 for _ in range(200)]
    precise_bn(bn, data, num_batches=200)
    exact_mean, exact_var = pooled(data, correction=1)
    torch.testing.assert_close(bn.running_var.double(), exact_var.double(), rtol=1e-5, atol=1e-6)
    # averaging per-batch biased variances misses the spread of the batch means: about half here
    mean_of_variances = torch.stack([x.var(0, correction=0) for x in data]).mean(0).double()
    assert torch.all(mean_of_variances < 0.7 * exact_var)


def test_a_layer_called_twice_per_forward_pools_both_calls():
    class SharedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(x) + self.bn(x[:, :, ::2, ::2] * 3 + 2).mean()

    model, data = SharedHead(), batches([4, 6])
    precise_bn(model, data, num_batches=2)
    inputs = [t for x in data for t in (x, x[:, :, ::2, ::2] * 3 + 2)]
    mean, var = pooled([t.double() for t in inputs], correction=1)
    torch.testing.assert_close(model.bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_other_modules_run_in_eval_mode_and_modes_are_restored():
    model = small_cnn().train()
    dropout_modes = []
    model[3].register_forward_pre_hook(lambda m, a: dropout_modes.append(m.training))
    precise_bn(model, batches([4, 4]), num_batches=2)
    assert dropout_modes == [False, False]
    assert all(m.training for m in model.modules())


def test_keep_modes_leaves_non_batchnorm_modules_as_they_are():
    model = small_cnn().train()
    dropout_modes = []
    model[3].register_forward_pre_hook(lambda m, a: dropout_modes.append(m.training))
    precise_bn(model, batches([4]), num_batches=1, keep_modes=True)
    assert dropout_modes == [True]


def test_only_running_statistics_change():
    model = small_cnn().eval()
    before = model_state(model)
    precise_bn(model, batches([5, 5]), num_batches=2)
    after = model_state(model)
    changed = {k for k in before["state"] if not torch.equal(before["state"][k], after["state"][k])}
    assert changed == {f"{i}.{b}" for i in (1, 5, 9) for b in ("running_mean", "running_var")}
    del before["state"], after["state"]
    assert before == after


def failing_data(exc, after):
    for i, x in enumerate(batches([4] * 10)):
        if i == after:
            raise exc
        yield x


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_an_interrupted_pass_leaves_the_model_exactly_as_it_was(exc):
    model = small_cnn().eval()
    before = model_state(model)
    with pytest.raises(type(exc)):
        precise_bn(model, failing_data(exc, after=3), num_batches=10)
    assert_same_state(before, model_state(model))


def test_non_finite_statistics_name_the_layer_and_change_nothing():
    model = small_cnn().eval()
    data = batches([4, 4])
    data[1][0, 0, 0, 0] = float("nan")
    before = model_state(model)
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm2d\)"):
        precise_bn(model, data, num_batches=2)
    assert_same_state(before, model_state(model))


def test_an_empty_loader_raises_and_changes_nothing():
    model = small_cnn()
    before = model_state(model)
    with pytest.raises(ValueError, match="no batches"):
        precise_bn(model, [], num_batches=3)
    assert_same_state(before, model_state(model))


def test_a_short_loader_warns_and_uses_what_it_had():
    model, data = small_cnn(), batches([4, 4])
    seen = captured_inputs(model, data)
    with pytest.warns(RuntimeWarning, match=r"after 2 batches \(8 samples\)"):
        report = precise_bn(model, data, num_samples=100)
    assert report.num_samples == 8
    mean, _ = pooled(seen["1"], correction=1)
    torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=1e-5, atol=1e-6)


def test_a_short_loader_is_an_error_when_strict():
    model = small_cnn()
    before = model_state(model)
    with pytest.raises(ValueError, match="short of the budget of 100 samples"):
        precise_bn(model, batches([4, 4]), num_samples=100, strict=True)
    assert_same_state(before, model_state(model))


def test_the_sample_budget_consumes_whole_batches_until_reached():
    consumed = []

    def data():
        for x in batches([4] * 10):
            consumed.append(len(x))
            yield x

    report = precise_bn(small_cnn(), data(), num_samples=10)
    assert consumed == [4, 4, 4] and report.num_samples == 12 and report.num_batches == 3


def test_dict_batches_with_input_key_and_a_device():
    model, data = small_cnn(), batches([4, 6])
    reference = copy.deepcopy(model)
    precise_bn(reference, data, num_batches=2)
    precise_bn(
        model, [{"image": x, "label": 0} for x in data], num_batches=2, input_key="image",
        device="cpu",
    )
    torch.testing.assert_close(model[9].running_var, reference[9].running_var)


def test_a_custom_forward_callable():
    model, data = small_cnn(), batches([4, 6])
    reference = copy.deepcopy(model)
    precise_bn(reference, [x * 2 for x in data], num_batches=2)
    precise_bn(model, [(0, x) for x in data], num_batches=2, forward=lambda m, b: m(b[1] * 2))
    torch.testing.assert_close(model[9].running_var, reference[9].running_var)


def test_a_dict_batch_without_input_key_is_a_clear_error():
    with pytest.raises(TypeError, match="input_key="):
        precise_bn(small_cnn(), [{"image": torch.randn(2, 3, 8, 8)}])


def test_report_counts_samples_values_per_channel_and_calls():
    report = precise_bn(small_cnn(), batches([4, 6]), num_batches=2)
    assert list(report.layers) == ["1", "5", "9"]
    assert all(layer.samples == 10 for layer in report.layers.values())
    assert report.layers["1"].count == 10 * 64 and report.layers["1"].calls == 2
    assert report.layers["5"].count == 10 * 9 and report.layers["9"].count == 10
    assert report.layers["9"].mean_shift > 0
    assert "| 5 | 10 | 90 | 2 |" in str(report)


@settings(max_examples=10, deadline=None)
@given(
    rank=st.integers(2, 5),
    sizes=st.lists(st.integers(2, 5), min_size=1, max_size=4),
    channels=st.integers(1, 3),
)
def test_any_input_rank_and_batch_sizes_match_the_reference(rank, sizes, channels):
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    bn = cls(channels)
    g = torch.Generator().manual_seed(len(sizes))
    data = [torch.randn(n, channels, *(3,) * (rank - 2), generator=g) * 4 - 1 for n in sizes]
    precise_bn(bn, data, num_batches=len(sizes), strict=True)
    mean, var = pooled([x.double() for x in data], correction=1)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_budget_arguments_are_validated_before_anything_runs():
    model = small_cnn()
    for kwargs in ({"num_batches": 0}, {"num_samples": -1}, {"pass_norm_batch_size": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            precise_bn(model, itertools.repeat(torch.randn(2, 3, 8, 8)), **kwargs)


def test_ghost_batchnorm_normalizes_whole_loader_batches_during_the_pass_by_default():
    from rethinkbn.layers import GhostBatchNorm

    torch.manual_seed(0)
    model = nn.Sequential(GhostBatchNorm(3, norm_batch_size=2), nn.Conv2d(3, 3, 1),
                          GhostBatchNorm(3, norm_batch_size=2))
    data = batches([8, 8])
    whole = copy.deepcopy(model)
    for m in (whole[0], whole[2]):
        m.norm_batch_size = None
    seen = captured_inputs(whole, data)
    precise_bn(model, data, num_batches=2)
    assert model[0].norm_batch_size == 2 and model[2].norm_batch_size == 2
    for name in ("0", "2"):
        mean, var = pooled(seen[name], correction=1)
        torch.testing.assert_close(model[int(name)].running_var.double(), var, rtol=1e-5,
                                   atol=1e-6)


def test_pass_norm_batch_size_normalizes_the_pass_in_groups():
    from rethinkbn.layers import GhostBatchNorm

    torch.manual_seed(0)
    model = nn.Sequential(GhostBatchNorm(3), nn.Conv2d(3, 3, 1), GhostBatchNorm(3))
    data = batches([8, 8])
    grouped = copy.deepcopy(model)
    grouped[0].norm_batch_size = 2
    seen = captured_inputs(grouped, data)
    precise_bn(model, data, num_batches=2, pass_norm_batch_size=2)
    assert model[0].norm_batch_size is None
    _, var = pooled(seen["2"], correction=1)
    torch.testing.assert_close(model[2].running_var.double(), var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("population_stats", ["domain", "shared"])
def test_domain_batchnorm_gathers_statistics_per_domain(population_stats):
    from rethinkbn.layers import DomainBatchNorm

    bn = DomainBatchNorm(3, num_domains=3, population_stats=population_stats)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 3, generator=g) + d, torch.tensor([0, 1, 0, 1, 1, 0]))
            for d in range(3)]
    before = bn.running_mean.clone()
    report = precise_bn(bn, data, num_batches=3, forward=lambda m, b: m(b[0], b[1]))
    xs = torch.cat([x for x, _ in data]).double()
    ids = torch.cat([i for _, i in data])
    if population_stats == "shared":
        mean, var = pooled([xs], correction=1)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    else:
        for d in (0, 1):
            mean, var = pooled([xs[ids == d]], correction=1)
            torch.testing.assert_close(bn.running_mean[d].double(), mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(bn.running_var[d].double(), var, rtol=1e-5, atol=1e-6)
        # domain 2 never appeared: it keeps its statistics
        assert torch.equal(bn.running_mean[2], before[2])
    assert report.layers["<model>"].count == 18


def frozen_model():
    from rethinkbn.layers import FrozenBatchNorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), FrozenBatchNorm(3), nn.BatchNorm2d(3))
    model[1].running_mean.fill_(0.3)
    return model


def test_frozen_batchnorm_is_skipped_by_default():
    model = frozen_model()
    before = model[1].running_mean.clone()
    report = precise_bn(model, batches([4]), num_batches=1)
    assert torch.equal(model[1].running_mean, before) and list(report.layers) == ["2"]


def test_frozen_batchnorm_gets_the_statistics_of_its_inputs_when_included():
    model, data = frozen_model(), batches([4, 5])
    with torch.no_grad():
        inputs = [model[0](x).double() for x in data]
    precise_bn(model, data, num_batches=2, include_frozen=True)
    mean, var = pooled(inputs, correction=1)
    torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_a_layer_never_called_keeps_its_statistics_with_a_warning():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

        def forward(self, x):
            return self.used(x)

    model = TwoHeads()
    model.unused.running_mean.fill_(7.0)
    with pytest.warns(RuntimeWarning, match="layer 'unused' was never called"):
        report = precise_bn(model, [torch.randn(4, 3)], num_batches=1)
    assert torch.all(model.unused.running_mean == 7.0)
    assert report.layers["unused"].calls == 0


def test_a_model_without_batchnorm_warns_and_reads_no_data():
    def data():
        raise AssertionError("the data should not be touched")
        yield

    with pytest.warns(RuntimeWarning, match="no BatchNorm layer"):
        report = precise_bn(nn.Linear(3, 3), data())
    assert report.layers == {} and report.num_batches == 0


def test_a_float64_model_gets_the_reference_to_float64_precision():
    model, data = small_cnn().double(), [x.double() for x in batches([5, 9, 3])]
    seen = captured_inputs(model, data)
    precise_bn(model, data, num_batches=3)
    for name, bn in batchnorm_layers(model):
        mean, var = pooled(seen[name], correction=1)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-12)


def test_the_progress_bar_can_be_forced_on(capsys):
    precise_bn(small_cnn(), batches([4, 4]), num_batches=2, progress=True)
    assert "precise_bn" in capsys.readouterr().err
