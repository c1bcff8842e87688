"""torch's ``BatchNorm(..., bias=False)`` (a weight, no bias) converts to every kind and back.

Each converted layer holds no bias either: it computes ``weight * xhat`` as torch's layer does
(compared with torch's layer in float64, outputs, gradients and running buffers), its
``state_dict`` keys are torch's, it trains the very weight Parameter, and it reverts to a torch
layer without bias.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

from gloo_world import GlooWorld
from rethinkbn.convert import (
    convert_batchnorm,
    fold_batchnorm,
    freeze_bn,
    revert_batchnorm,
    to_domain_bn,
    to_ghost_bn,
    unfreeze_bn,
)
from rethinkbn.distributed import SyncBatchNorm, to_sync_bn
from rethinkbn.layers import DomainBatchNorm, use_domain

# kind -> (conversion, whether its training forward normalizes with the batch as torch's does)
CONVERSIONS = {
    "ghost": (lambda m: to_ghost_bn(m, norm_batch_size=8), True),  # one group: the whole batch
    "frozen": (freeze_bn, False),
    "domain": (lambda m: to_domain_bn(m, num_domains=2), True),
    "domain_affine": (lambda m: to_domain_bn(m, num_domains=2, affine="domain"), True),
    "sync": (to_sync_bn, True),  # no process group: the local batch
    "per_device": (lambda m: convert_batchnorm(m, "per_device", num_devices=1), True),
}


def no_bias_net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, bias=False),
                          nn.ReLU()).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def step(model: nn.Module, x: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward and backward in domain 0; the output and the BatchNorm's weight gradient."""
    model.train(training)
    domains = any(isinstance(m, DomainBatchNorm) for m in model.modules())
    with use_domain(model, 0) if domains else nullcontext():
        y = model(x)
    y.pow(2).sum().backward()
    grad = model[1].weight.grad
    return y.detach(), grad if grad.dim() == 1 else grad[0]


@pytest.mark.parametrize("kind", list(CONVERSIONS))
def test_a_layer_without_bias_converts_and_computes_what_torchs_computes(kind):
    convert, follows_batch = CONVERSIONS[kind]
    reference = no_bias_net()
    model = convert(copy.deepcopy(reference))
    layer = model[1]
    assert layer.bias is None and layer.affine in (True, "shared", "domain")
    assert list(layer.state_dict()) == list(reference[1].state_dict())
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    for training in (False, True):
        ours = step(model, x, training)
        theirs = step(reference, x, training and follows_batch)
        assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
        model.zero_grad()
        reference.zero_grad()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        mine, theirs = getattr(layer, name), getattr(reference[1], name)
        assert_close(mine if mine.dim() == theirs.dim() else mine[0], theirs, rtol=1e-10,
                     atol=1e-10, msg=name)

@pytest.mark.parametrize("kind", list(CONVERSIONS))
def test_a_layer_without_bias_reverts_to_a_torch_layer_without_bias(kind):
    reference = no_bias_net()
    weight = reference[1].weight
    model = revert_batchnorm(CONVERSIONS[kind][0](reference), domain=0)
    assert type(model[1]) is nn.BatchNorm2d and model[1].bias is None
    if kind != "domain_affine":  # per-domain weights are copies; the others the same object
        assert model[1].weight is weight
    assert list(model[1].state_dict()) == list(no_bias_net()[1].state_dict())
    for key, value in no_bias_net()[1].state_dict().items():
        assert torch.equal(model[1].state_dict()[key], value), key


def test_every_kind_hands_on_a_layer_without_bias():
    reference = no_bias_net()
    weight = reference[1].weight
    model = to_ghost_bn(reference, norm_batch_size=2)
    model = freeze_bn(model, affine_trainable=False)
    assert not weight.requires_grad
    model = to_sync_bn(unfreeze_bn(model))
    assert weight.requires_grad and type(model[1]) is SyncBatchNorm and model[1].bias is None
    model = revert_batchnorm(to_domain_bn(model, num_domains=3), domain=2)
    assert type(model[1]) is nn.BatchNorm2d and model[1].weight is weight
    assert model[1].bias is None and [p for p in model.parameters()] == [model[0].weight, weight]


def test_per_domain_weights_without_bias_revert_to_the_chosen_domains():
    model = to_domain_bn(no_bias_net(), num_domains=2, affine="domain")
    assert model[1].weight.shape == (2, 4) and model[1].bias is None
    with torch.no_grad():
        model[1].weight[1].mul_(3.0)
    expected = model[1].weight[1].clone()
    model = revert_batchnorm(model, domain=1)
    assert torch.equal(model[1].weight, expected) and model[1].bias is None


@pytest.mark.parametrize("kind", ["torch", "ghost", "frozen"])
def test_a_layer_without_bias_folds_into_its_convolution(kind):
    model = no_bias_net()
    if kind != "torch":
        model = CONVERSIONS[kind][0](model)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    folded = fold_batchnorm(model)
    assert isinstance(folded[1], nn.Identity)
    assert_close(folded(x), model.eval()(x), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- two real ranks
def run_sync_without_bias(x: torch.Tensor) -> dict[str, torch.Tensor]:
    rank = dist.get_rank()
    torch.manual_seed(0)
    layer = to_sync_bn(nn.Sequential(nn.BatchNorm1d(3, bias=False).double()))[0]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    local = x[rank * 4:(rank + 1) * 4].clone().requires_grad_()
    y = layer(local)
    y.pow(2).sum().backward()
    return {"y": y.detach(), "dx": local.grad, "dw": layer.weight.grad,
            "running_var": layer.running_var.clone()}


def test_sync_bn_without_bias_equals_torchs_layer_on_the_concatenated_batch():
    x = torch.randn(8, 3, dtype=torch.float64) * 2 + 1
    with GlooWorld(2) as world:
        ranks = world.run(run_sync_without_bias, x)
    reference = nn.BatchNorm1d(3, bias=False).double()
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    xr = x.clone().requires_grad_()
    y = reference(xr)
    y.pow(2).sum().backward()
    assert_close(torch.cat([r["y"] for r in ranks]), y.detach())
    assert_close(torch.cat([r["dx"] for r in ranks]), xr.grad)
    assert_close(sum(r["dw"] for r in ranks), reference.weight.grad)  # local sums, as torch's
    for r in ranks:
        assert_close(r["running_var"], reference.running_var)


def test_a_converted_layer_without_bias_resets_its_parameters():
    layer = to_ghost_bn(no_bias_net(), norm_batch_size=2)[1]
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(4, dtype=torch.float64)) and layer.bias is None
