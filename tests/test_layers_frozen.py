"""FrozenBatchNorm: torch's eval-mode BatchNorm in training too, with learning affine parameters."""

import pytest
import torch
from torch import nn

from rethinkbn.layers import FrozenBatchNorm
from rethinkbn.stats import Moments


def frozen_from(bn, **kw):
    layer = FrozenBatchNorm(
        bn.num_features, eps=bn.eps, momentum=bn.momentum, dtype=bn.weight.dtype, **kw
    )
    layer.load_state_dict(bn.state_dict())
    return layer


def trained_bn(dtype=torch.float64):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).to(dtype)
    for _ in range(3):
        bn(torch.randn(8, 3, 4, 4, dtype=dtype) * 2 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn.eval()


@pytest.mark.parametrize("training", [True, False])
def test_normalizes_like_torch_eval_batchnorm_in_train_and_eval(training):
    bn = trained_bn()
    layer = frozen_from(bn).train(training)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), bn(x))


def test_running_statistics_never_change_in_training():
    bn = trained_bn()
    layer = frozen_from(bn).train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for _ in range(3):
        layer(torch.randn(8, 3, 4, 4, dtype=torch.float64) + 5).sum().backward()
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_affine_parameters_learn_with_the_gradients_of_eval_batchnorm():
    bn = trained_bn()
    layer = frozen_from(bn).train()
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    layer(x).square().sum().backward()
    bn(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, bn.weight.grad)
    torch.testing.assert_close(layer.bias.grad, bn.bias.grad)


def test_affine_trainable_false_keeps_parameters_and_keys_but_stops_their_gradients():
    layer = FrozenBatchNorm(3, affine_trainable=False)
    assert list(layer.state_dict()) == list(nn.BatchNorm2d(3).state_dict())
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    x = torch.randn(4, 3, 2, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is None


def test_unfreezing_restores_the_original_layer_exactly():
    bn = nn.BatchNorm2d(3, eps=1e-3, momentum=0.3)
    layer = frozen_from(bn)
    restored = nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    restored.load_state_dict(layer.state_dict())
    assert (restored.eps, restored.momentum) == (bn.eps, bn.momentum)
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in bn.state_dict().items())


def test_float16_variance_that_underflows_gives_no_nan():
    layer = FrozenBatchNorm(3, eps=1e-10).half()
    layer.running_var.fill_(1e-12)  # 0 in float16: rsqrt(var + eps) would be inf
    assert layer.running_var.eq(0).all()
    y = layer(torch.zeros(2, 3, 4).half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


def test_float16_input_with_large_mean_keeps_float32_accuracy():
    bn = trained_bn(torch.float32)
    with torch.no_grad():
        bn.running_mean.fill_(300.0)
    layer = frozen_from(bn)
    x = (torch.randn(4, 3, 4, 4) + 300).half()
    expected = bn(x.float())
    torch.testing.assert_close(layer(x).float(), expected, atol=4e-3, rtol=2e-3)


def test_without_running_statistics_it_normalizes_with_batch_statistics_like_torch():
    torch.manual_seed(0)
    layer = FrozenBatchNorm(3, track_running_stats=False).eval()
    bn = nn.BatchNorm1d(3, track_running_stats=False).eval()
    x = torch.randn(8, 3, 5)
    torch.testing.assert_close(layer(x), bn(x))


@pytest.mark.parametrize("training", [True, False])
def test_without_running_statistics_one_value_per_channel_is_a_named_error(training):
    layer = FrozenBatchNorm(3, track_running_stats=False).train(training)
    layer._rethinkbn_name = "head.bn"
    with pytest.raises(ValueError, match="'head.bn'.*more than 1 value per channel.*got 1"):
        layer(torch.randn(1, 3))


def test_without_running_statistics_the_observer_gets_the_batch_moments():
    layer = FrozenBatchNorm(3, track_running_stats=False)
    seen = []
    layer.observer = lambda module, moments: seen.append(moments)
    x = torch.randn(6, 3, 4) * 2 + 3
    layer(x)
    expected = Moments.of(x)
    assert len(seen) == 1 and torch.equal(seen[0].count, expected.count)
    torch.testing.assert_close(seen[0].mean, expected.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen[0].m2, expected.m2, rtol=1e-6, atol=1e-6)


def test_with_running_statistics_the_observer_is_never_called():
    layer = FrozenBatchNorm(3)
    layer.observer = lambda module, moments: pytest.fail("FrozenBatchNorm used batch statistics")
    layer(torch.randn(6, 3, 4))


def test_gradcheck_in_float64():
    bn = trained_bn()
    layer = frozen_from(bn)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: layer(x), (x, layer.weight, layer.bias))
