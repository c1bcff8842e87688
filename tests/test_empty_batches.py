"""Empty batches (N=0) contribute nothing: exact pooled statistics of the other batches."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rethinkbn.convert import freeze_bn
from rethinkbn.layers import DomainBatchNorm, GhostBatchNorm
from rethinkbn.population import batch_stats_inference, ema_report, precise_bn, recompute_stats


def domain_layer():
    layer = DomainBatchNorm(3, num_domains=1)
    layer.current_domain = 0
    return layer


def layers():
    return {
        "torch": lambda: nn.BatchNorm1d(3),
        "ghost": lambda: GhostBatchNorm(3),
        "ghost_nbs2": lambda: GhostBatchNorm(3, norm_batch_size=2),
        "domain": domain_layer,
    }


def model_with(kind):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), layers()[kind]())


def with_empty(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 2, generator=g), torch.randn(0, 2), torch.randn(5, 2, generator=g),
            torch.randn(0, 2)]


def reference(model, data):
    """float64 mean and unbiased variance of the concatenated BatchNorm inputs."""
    with torch.no_grad():
        x = torch.cat([model[0](d) for d in data]).double()
    return x.mean(0), x.var(0)


@pytest.mark.parametrize("kind", list(layers()))
def test_precise_bn_ignores_empty_batches(kind):
    # the reproducer: torch's BN kept the previous batch's variance with count 0
    model, data = model_with(kind), with_empty()
    mean, var = reference(model, data)
    report = precise_bn(model, data, num_batches=len(data))
    got_mean, got_var = (model[1].running_mean.reshape(3), model[1].running_var.reshape(3))
    torch.testing.assert_close(got_mean.double(), mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_var.double(), var, rtol=1e-6, atol=1e-7)
    assert report.num_samples == 9 and report.num_batches == 4
    assert report.layers["1"].count == 9


@pytest.mark.parametrize("kind", ["torch", "ghost"])
def test_recompute_stats_and_ema_report_ignore_empty_batches(kind):
    model, data = model_with(kind), with_empty()
    mean, var = reference(model, data)
    snapshot = recompute_stats(model, data, num_batches=len(data))
    torch.testing.assert_close(snapshot["1"]["running_var"].double(), var, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(snapshot["1"]["running_mean"].double(), mean, rtol=1e-6,
                               atol=1e-7)
    report = ema_report(model, data, num_batches=len(data))
    assert report.layers["1"].calls == 2  # the non-empty calls


@pytest.mark.parametrize("kind", ["torch", "ghost"])
def test_a_loader_of_only_empty_batches_raises_and_changes_nothing(kind):
    model = model_with(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="all empty"):
        precise_bn(model, [torch.randn(0, 2)] * 3, num_batches=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", list(layers()))
@pytest.mark.parametrize("norm_batch_size", [None, 2])
def test_batch_stats_inference_returns_an_empty_output_for_an_empty_batch(kind, norm_batch_size):
    if kind == "domain" and norm_batch_size is not None:
        pytest.skip("DomainBatchNorm cannot group")
    model = model_with(kind).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with batch_stats_inference(model, norm_batch_size=norm_batch_size):
        assert model(torch.randn(0, 2)).shape == (0, 3)
        x = torch.randn(4, 2)
        y = model(x)
    z = model[0](x).detach()
    expected = (z - z.mean(0)) / (z.var(0, unbiased=False) + model[1].eps).sqrt()
    if norm_batch_size is None:
        torch.testing.assert_close(y, expected * model[1].weight + model[1].bias)
    assert model.training and model[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class EmptySecondCall(nn.Module):
    """Calls its BatchNorm twice per forward, the second time on zero samples (an empty head)."""

    def __init__(self, bn):
        super().__init__()
        self.linear, self.bn = nn.Linear(2, 3), bn

    def forward(self, x):
        return self.bn(self.linear(x)) + self.bn(self.linear(x[:0])).sum()


@pytest.mark.parametrize("kind", ["torch", "ghost"])
def test_an_empty_call_inside_a_batch_contributes_nothing(kind):
    torch.manual_seed(0)
    model, data = EmptySecondCall(layers()[kind]()), with_empty()
    precise_bn(model, data, num_batches=len(data))
    with torch.no_grad():
        x = torch.cat([model.linear(d) for d in data]).double()
    torch.testing.assert_close(model.bn.running_var.double(), x.var(0), rtol=1e-6, atol=1e-7)


def test_frozen_layers_estimated_with_include_frozen_ignore_empty_batches():
    model = freeze_bn(model_with("torch"))
    data = with_empty()
    mean, var = reference(model, data)
    precise_bn(model, data, num_batches=len(data), include_frozen=True)
    torch.testing.assert_close(model[1].running_var.double(), var, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=1e-6, atol=1e-7)


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 0, 2, 3, 5]), min_size=1, max_size=6)
       .filter(lambda s: sum(s) >= 2), kind=st.sampled_from(["torch", "ghost", "domain"]))
def test_any_mix_of_empty_and_full_batches_gives_the_pooled_statistics(sizes, kind):
    model = model_with(kind)
    g = torch.Generator().manual_seed(len(sizes))
    data = [torch.randn(n, 2, generator=g) * 3 + 1 for n in sizes]
    mean, var = reference(model, data)
    precise_bn(model, data, num_batches=len(data))
    got_mean, got_var = (model[1].running_mean.reshape(3), model[1].running_var.reshape(3))
    torch.testing.assert_close(got_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_var.double(), var, rtol=1e-6, atol=1e-6)
