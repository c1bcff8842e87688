"""DomainBatchNorm against references built from one torch BatchNorm per domain, or one shared."""

import pytest
import torch
from torch import nn

from rethinkbn.layers import DomainBatchNorm, use_domain
from rethinkbn.stats import Moments

TABLE_5 = [  # (train_stats, population_stats, affine): the six rows of the paper's Table 5
    ("shared", "shared", "shared"),
    ("shared", "domain", "shared"),
    ("domain", "shared", "shared"),
    ("domain", "domain", "shared"),
    ("domain", "shared", "domain"),
    ("domain", "domain", "domain"),
]


def batch(n=12, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, 5, generator=gen, dtype=torch.float64)
    ids = torch.tensor([0, 2, 2, 0, 2, 0, 0, 2, 0, 2, 2, 0])[:n]  # domain 1 is absent
    return x + ids[:, None, None] * 3.0, ids


def layer_like(train, pop, affine, num_domains=3, **kw):
    torch.manual_seed(0)
    layer = DomainBatchNorm(3, num_domains, train, pop, affine, dtype=torch.float64, **kw)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    return layer


def torch_bn(layer, domain=None):
    """A torch BatchNorm holding the parameters of one domain (or the shared ones)."""
    bn = nn.BatchNorm1d(3, momentum=layer.momentum, dtype=torch.float64)
    with torch.no_grad():
        pick = (lambda t: t if t.dim() == 1 or domain is None else t[domain])
        bn.weight.copy_(pick(layer.weight))
        bn.bias.copy_(pick(layer.bias))
    return bn


def test_one_domain_with_everything_shared_equals_torch_batchnorm():
    layer = layer_like("shared", "shared", "shared", num_domains=1)
    bn = torch_bn(layer)
    for seed in range(3):
        x, _ = batch(seed=seed)
        torch.testing.assert_close(layer(x, domain=0), bn(x))
    torch.testing.assert_close(layer.state_dict(), bn.state_dict())


def test_per_sample_ids_equal_a_loop_over_domains_in_outputs_gradients_and_buffers():
    layer = layer_like("domain", "domain", "domain")
    x, ids = batch()
    x1 = x.clone().requires_grad_()
    y = layer(x1, domain=ids)
    grad = torch.randn_like(y)
    y.backward(grad)
    for d in (0, 2):
        bn = torch_bn(layer, d)
        xd = x[ids == d].clone().requires_grad_()
        yd = bn(xd)
        yd.backward(grad[ids == d])
        torch.testing.assert_close(y[ids == d], yd)
        torch.testing.assert_close(x1.grad[ids == d], xd.grad)
        torch.testing.assert_close(layer.weight.grad[d], bn.weight.grad)
        torch.testing.assert_close(layer.bias.grad[d], bn.bias.grad)
        torch.testing.assert_close(layer.running_mean[d], bn.running_mean)
        torch.testing.assert_close(layer.running_var[d], bn.running_var)
    # The absent domain keeps its initial state and gets no gradient.
    assert torch.equal(layer.running_mean[1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(layer.weight.grad[1], torch.zeros(3, dtype=torch.float64))
    assert layer.num_batches_tracked.tolist() == [1, 0, 1]


def test_an_int_domain_normalizes_the_batch_with_that_domains_state():
    layer = layer_like("domain", "domain", "domain")
    x, _ = batch()
    bn = torch_bn(layer, 2)
    torch.testing.assert_close(layer(x, domain=2), bn(x))
    torch.testing.assert_close(layer.running_var[2], bn.running_var)
    layer.eval(), bn.eval()
    torch.testing.assert_close(layer(x, domain=2), bn(x))


def test_eval_normalizes_each_sample_with_its_domains_population_statistics():
    layer = layer_like("domain", "domain", "domain")
    for seed in range(2):
        layer(*batch(seed=seed))
    layer.eval()
    x, ids = batch(seed=5)
    y = layer(x, domain=ids)
    for d in (0, 2):
        torch.testing.assert_close(y[ids == d], layer(x[ids == d], domain=d))
        bn = torch_bn(layer, d).eval()
        bn.running_mean.copy_(layer.running_mean[d]), bn.running_var.copy_(layer.running_var[d])
        torch.testing.assert_close(y[ids == d], bn(x[ids == d]))


def test_shared_population_statistics_follow_the_whole_batch():
    layer = layer_like("domain", "shared", "shared")
    x, ids = batch()
    layer(x, domain=ids)
    bn = torch_bn(layer)
    bn(x)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    layer.eval(), bn.eval()
    torch.testing.assert_close(layer(x, domain=ids), bn(x))


def test_shared_training_with_domain_population_statistics_is_table_5_row_2():
    layer = layer_like("shared", "domain", "shared")
    x, ids = batch()
    torch.testing.assert_close(layer(x, domain=ids), torch_bn(layer)(x))
    for d in (0, 2):
        bn = torch_bn(layer, d)
        bn(x[ids == d])
        torch.testing.assert_close(layer.running_mean[d], bn.running_mean)
        torch.testing.assert_close(layer.running_var[d], bn.running_var)


def test_domain_affine_with_shared_training_applies_each_samples_parameters():
    layer = layer_like("shared", "shared", "domain")
    x, ids = batch()
    y = layer(x, domain=ids)
    normalized = nn.functional.batch_norm(x, None, None, training=True)
    expected = normalized * layer.weight[ids][..., None] + layer.bias[ids][..., None]
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("flags", TABLE_5, ids=["-".join(f) for f in TABLE_5])
def test_every_table_5_combination_trains_evaluates_and_round_trips(flags):
    layer = layer_like(*flags)
    x, ids = batch()
    layer(x, domain=ids).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    copy = layer_like(*flags)
    copy.load_state_dict(layer.state_dict())
    assert all(torch.equal(v, copy.state_dict()[k]) for k, v in layer.state_dict().items())
    layer.eval(), copy.eval()
    torch.testing.assert_close(layer(x, domain=ids), copy(x, domain=ids))


def test_momentum_none_averages_each_domain_over_its_own_batches():
    layer = layer_like("domain", "domain", "shared", momentum=None)
    means = {0: [], 2: []}
    for seed in range(3):
        x, ids = batch(seed=seed)
        keep = ids != 2 if seed == 1 else ids >= 0  # domain 2 skips the middle step
        layer(x[keep], domain=ids[keep])
        for d in means:
            if (ids[keep] == d).any():
                means[d].append(x[keep][ids[keep] == d].mean((0, 2)))
    assert layer.num_batches_tracked.tolist() == [3, 0, 2]
    for d, steps in means.items():
        torch.testing.assert_close(layer.running_mean[d], torch.stack(steps).mean(0))


def test_observer_receives_per_domain_moments_with_zero_counts_for_absent_domains():
    layer = layer_like("domain", "domain", "shared")
    seen = []
    layer.observer = lambda module, moments: seen.append(moments)
    x, ids = batch()
    layer(x, domain=ids)
    layer(x, domain=1)
    assert [m.shape for m in seen] == [(3, 3), (3, 3)]
    assert seen[0].count[:, 0].tolist() == [30.0, 0.0, 30.0]
    torch.testing.assert_close(seen[0].mean[2], Moments.of(x[ids == 2]).mean)
    assert seen[1].count[:, 0].tolist() == [0.0, 60.0, 0.0]


def test_torch_checkpoint_initializes_every_domain():
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(), bn.weight.uniform_()
    bn.num_batches_tracked.fill_(4)
    layer = DomainBatchNorm(3, 2, affine="domain")
    layer.load_state_dict(bn.state_dict())
    assert torch.equal(layer.running_mean, bn.running_mean.expand(2, 3))
    assert torch.equal(layer.weight.data, bn.weight.data.expand(2, 3))
    assert layer.num_batches_tracked.tolist() == [4, 4]


def test_use_domain_sets_every_layer_and_restores_the_previous_domain():
    model = nn.Sequential(DomainBatchNorm(3, 2), nn.ReLU(), DomainBatchNorm(3, 2))
    model[2].current_domain = 1
    with use_domain(model, 0):
        assert [model[0].current_domain, model[2].current_domain] == [0, 0]
        model(torch.randn(4, 3))
        with pytest.raises(RuntimeError), use_domain(model, 1):
            raise RuntimeError("inside")
        assert model[0].current_domain == 0
    assert [model[0].current_domain, model[2].current_domain] == [None, 1]


def test_use_domain_with_an_invalid_domain_changes_nothing():
    model = nn.Sequential(DomainBatchNorm(3, 4), DomainBatchNorm(3, 2))
    with pytest.raises(ValueError, match=r"domain must be in \[0, 2\), got 3"):
        with use_domain(model, 3):
            pass
    assert model[0].current_domain is None


def test_use_domain_warns_for_a_model_without_domain_batchnorm():
    with pytest.warns(UserWarning, match="no DomainBatchNorm"), use_domain(nn.Linear(2, 2), 0):
        pass


def test_missing_domain_is_a_clear_error():
    layer = DomainBatchNorm(3, 2)
    layer._rethinkbn_name = "head.bn"
    with pytest.raises(ValueError, match="'head.bn'.*no domain given.*use_domain"):
        layer(torch.randn(4, 3))


@pytest.mark.parametrize(
    ("domain", "error", "message"),
    [
        (2, ValueError, r"domain must be in \[0, 2\), got 2"),
        (-1, ValueError, r"domain must be in \[0, 2\), got -1"),
        (torch.tensor([0, 1, 2, 0]), ValueError, r"domain ids must be in \[0, 2\).*to 2"),
        (torch.tensor([0, 1, 1]), ValueError, "one domain id per sample"),
        (torch.tensor([0.0, 1, 1, 0]), TypeError, "1-D integer tensor"),
        ("a", TypeError, "int or a 1-D integer tensor"),
    ],
)
def test_bad_domains_raise_naming_the_layer_and_leave_it_unchanged(domain, error, message):
    layer = DomainBatchNorm(3, 2)
    layer._rethinkbn_name = "head.bn"
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=message) as info:
        layer(torch.randn(4, 3), domain=domain)
    assert "'head.bn'" in str(info.value)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_a_domain_with_one_value_per_channel_is_rejected():
    layer = DomainBatchNorm(3, 2)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*domain\(s\) \[1\]"):
        layer(torch.randn(4, 3), domain=torch.tensor([0, 0, 0, 1]))
    assert layer.num_batches_tracked.tolist() == [0, 0]


@pytest.mark.parametrize("flags", TABLE_5[2:4], ids=["domain-shared", "domain-domain"])
def test_gradcheck_with_per_sample_domains(flags):
    layer = layer_like(*flags)
    x, ids = batch(n=8)
    x = x[:, :, :2].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b: layer(x, domain=ids), (x, layer.weight, layer.bias)
    )


def test_flags_are_validated():
    for kw, message in [({"train_stats": "level"}, "train_stats"),
                        ({"population_stats": "x"}, "population_stats"),
                        ({"affine": "both"}, "affine"), ({"num_domains": 0}, "num_domains")]:
        args = {"num_features": 3, "num_domains": 2, **kw}
        with pytest.raises(ValueError, match=message):
            DomainBatchNorm(**args)


def test_an_empty_batch_with_per_sample_ids_in_eval_gives_an_empty_output_like_torch():
    # Found by tests/test_adversarial_layers.py: channel_view could not reshape 0 samples.
    layer = DomainBatchNorm(3, 2, affine="domain").eval()
    x = torch.randn(0, 3, 4)
    assert layer(x, domain=torch.zeros(0, dtype=torch.long)).shape == (0, 3, 4)


@pytest.mark.parametrize("train_stats", ["domain", "shared"])
def test_an_empty_training_batch_with_per_sample_ids_raises_naming_the_layer(train_stats):
    # Found by tests/test_adversarial_layers.py: a raw Moments.of error, or shared buffers
    # counting a NaN event for a batch with no values.
    layer = DomainBatchNorm(3, 2, train_stats=train_stats, population_stats="shared")
    layer._rethinkbn_name = "head.bn"
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="'head.bn'.*more than 1 value per channel"):
        layer(torch.randn(0, 3, 4), domain=torch.zeros(0, dtype=torch.long))
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_per_sample_ids_follow_the_input_s_device():
    # Issue 13 sec. 3: ids on the CPU and x on CUDA crashed in index_add; the meta device shows
    # the move without a GPU.
    layer = DomainBatchNorm(3, 2, validate=False).to("meta")
    y = layer(torch.empty(4, 3, device="meta"), domain=torch.tensor([0, 1, 1, 0]))
    assert y.device.type == "meta"
