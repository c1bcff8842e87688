"""fold_batchnorm: BatchNorm merged into the layer before it, outputs unchanged, never wrongly."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rethinkbn.convert import FoldedLinear, fold_batchnorm, freeze_bn, to_domain_bn, to_ghost_bn
from rethinkbn.layers import is_batchnorm


def randomize_bn(model):
    """Non-trivial running statistics and affine parameters (a freshly built BN is identity)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if is_batchnorm(m) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if is_batchnorm(m) and m.weight is not None:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_folds_exactly(model, x, folded_count):
    """The folded copy computes the eval model's outputs (1e-5 relative) with fewer BNs."""
    model = randomize_bn(model)
    expected = copy.deepcopy(model).eval()(x)
    folded = fold_batchnorm(model)
    remaining = sum(is_batchnorm(m) for m in folded.modules())
    assert sum(is_batchnorm(m) for m in model.modules()) - remaining == folded_count
    assert rel_err(folded(x), expected) <= 1e-5
    return folded


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_a_resnet_with_residual_adds_folds_every_batchnorm():
    folded = assert_folds_exactly(ResNet(), torch.randn(2, 3, 8, 8), folded_count=7)
    assert isinstance(folded.blocks[0].bn1, nn.Identity)
    assert folded.blocks[0].conv1.bias is not None


def test_the_original_model_is_untouched_and_the_copy_is_in_eval_mode():
    model = randomize_bn(ResNet()).train()
    state = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model)
    assert model.training and not folded.training
    assert isinstance(model.blocks[0].bn1, nn.BatchNorm2d)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_sequential_folds_conv_then_batchnorm():
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 4, 1),
                          nn.BatchNorm1d(4))
    assert_folds_exactly(model, torch.randn(2, 3, 9), folded_count=2)


def test_linear_then_batchnorm1d_folds_and_refuses_inputs_it_would_misnormalize():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    folded = assert_folds_exactly(model, torch.randn(3, 5), folded_count=1)
    assert type(folded[0]) is FoldedLinear
    with pytest.raises(ValueError, match=r"expected an input of shape \(N, 5\)"):
        folded(torch.randn(3, 4, 5))


def test_a_conv3d_without_bias_gets_one():
    model = nn.Sequential(nn.Conv3d(2, 3, 2, bias=False), nn.BatchNorm3d(3, affine=False))
    folded = assert_folds_exactly(model, torch.randn(2, 2, 3, 3, 3), folded_count=1)
    assert folded[0].bias is not None


class UsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_conv_whose_output_is_also_used_elsewhere_is_not_folded():
    assert_folds_exactly(UsedTwice(), torch.randn(2, 3, 4, 4), folded_count=0)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


def test_a_conv_called_twice_is_not_folded():
    assert_folds_exactly(CalledTwice(), torch.randn(2, 3, 4, 4), folded_count=0)


def test_a_batchnorm_reused_after_two_convs_is_not_folded():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bn, nn.Conv2d(3, 3, 1), bn)
    assert_folds_exactly(model, torch.randn(2, 3, 4, 4), folded_count=0)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, Sequential adjacency still works."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.body(x)
        return self.bn(self.conv(y)) if y.sum() > 0 else self.bn(self.conv(-y))


def test_an_untraceable_model_folds_inside_its_sequentials_only():
    folded = assert_folds_exactly(Untraceable(), torch.randn(2, 3, 4, 4), folded_count=1)
    assert isinstance(folded.body[1], nn.Identity) and isinstance(folded.bn, nn.BatchNorm2d)


def test_batchnorm_without_running_statistics_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    assert_folds_exactly(model, torch.randn(2, 3, 4, 4), folded_count=0)


def test_a_batchnorm_subclass_is_not_folded():
    class BatchNormAct2d(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4))
    assert_folds_exactly(model, torch.randn(2, 3, 4, 4), folded_count=0)


@pytest.mark.parametrize("convert", [freeze_bn, lambda m: to_ghost_bn(m, norm_batch_size=2)])
def test_frozen_and_ghost_layers_fold_in_eval_mode(convert):
    model = convert(randomize_bn(ResNet()))
    assert_folds_exactly(model, torch.randn(2, 3, 8, 8), folded_count=7)


def test_domain_layers_fold_only_with_one_set_of_population_statistics():
    per_domain = to_domain_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), 2)
    assert is_batchnorm(fold_batchnorm(per_domain)[1])
    shared = to_domain_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), 2,
                          population_stats="shared")
    assert isinstance(fold_batchnorm(shared)[1], nn.Identity)


@settings(max_examples=12, deadline=None)
@given(
    dims=st.sampled_from([1, 2, 3]),
    transpose=st.booleans(),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    affine=st.booleans(),
    stride=st.sampled_from([1, 2]),
)
def test_conv_and_conv_transpose_of_any_rank_and_groups_fold(
    dims, transpose, groups, bias, affine, stride
):
    name = f"ConvTranspose{dims}d" if transpose else f"Conv{dims}d"
    conv = getattr(nn, name)(4, 6, 3, stride=stride, groups=groups, bias=bias,
                             dtype=torch.float64)
    bn = getattr(nn, f"BatchNorm{dims}d")(6, affine=affine, dtype=torch.float64)
    x = torch.randn(2, 4, *[5] * dims, dtype=torch.float64)
    assert_folds_exactly(nn.Sequential(conv, bn), x, folded_count=1)


HOOKS = {
    "forward": lambda m: m.register_forward_hook(lambda *a: None),
    "forward_with_kwargs": lambda m: m.register_forward_hook(lambda *a: None, with_kwargs=True),
    "forward_pre": lambda m: m.register_forward_pre_hook(lambda *a: None),
    "full_backward": lambda m: m.register_full_backward_hook(lambda *a: None),
    "full_backward_pre": lambda m: m.register_full_backward_pre_hook(lambda *a: None),
}


@pytest.mark.parametrize("on", [0, 1])
@pytest.mark.parametrize("hook", list(HOOKS))
def test_a_pair_with_any_hook_is_not_folded(hook, on):
    # fold and convert read one list of hook slots (surgery.HOOK_ATTRS)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    HOOKS[hook](model[on])
    assert_folds_exactly(model, torch.randn(2, 3, 4, 4), folded_count=0)
