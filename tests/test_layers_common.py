"""What every layer of the family shares with torch's BatchNorm: state, dtypes, layouts, errors."""

import pytest
import torch
from torch import nn

from rethinkbn.layers import (
    BatchNormBase,
    DomainBatchNorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    is_batchnorm,
)

TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def ghost_whole(c, **kw):
    return GhostBatchNorm(c, **kw)


def ghost_groups(c, **kw):
    return GhostBatchNorm(c, norm_batch_size=2, **kw)


def ghost_strided_unequal(c, **kw):
    return GhostBatchNorm(c, norm_batch_size=3, grouping="strided", **kw)


def frozen(c, **kw):
    return FrozenBatchNorm(c, **kw)


def domain_one(c, **kw):
    layer = DomainBatchNorm(c, 1, train_stats="shared", population_stats="shared", **kw)
    layer.current_domain = 0
    return layer


def domain_ids(c, **kw):
    layer = DomainBatchNorm(c, 3, **kw)
    layer.current_domain = 1
    return layer


ALL = [ghost_whole, ghost_groups, ghost_strided_unequal, frozen, domain_one, domain_ids]
# Layers that equal torch's BatchNorm in training: whole batch, one shared domain.
TORCH_EQUAL = [ghost_whole, domain_one]


def shape_of(rank, n=8, c=3):
    return (n, c) + (4, 3, 2)[: rank - 2]


def randomize(*layers):
    """Same random affine parameters and running statistics in every layer given."""
    gen = torch.Generator().manual_seed(1)
    first = layers[0]
    for name, t in list(first.named_parameters()) + list(first.named_buffers()):
        if t.is_floating_point():
            values = torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5
            for layer in layers:
                with torch.no_grad():
                    getattr(layer, name).copy_(values)


@pytest.mark.parametrize("make", ALL)
def test_state_dict_keys_equal_torch_batchnorm(make):
    assert list(make(3).state_dict()) == list(nn.BatchNorm2d(3).state_dict())


@pytest.mark.parametrize("make", ALL)
def test_torch_checkpoint_loads_unchanged(make):
    bn = nn.BatchNorm2d(3)
    randomize(bn)
    bn.num_batches_tracked.fill_(7)
    layer = make(3)
    layer.load_state_dict(bn.state_dict())
    for key, value in bn.state_dict().items():
        mine = layer.state_dict()[key]
        assert torch.equal(mine, value.expand_as(mine))


@pytest.mark.parametrize("make", TORCH_EQUAL)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize(
    "options",
    [{}, {"affine": False}, {"momentum": None}, {"track_running_stats": False}],
    ids=["default", "affine=False", "momentum=None", "no-running-stats"],
)
def test_equals_torch_batchnorm_in_train_and_eval(make, rank, options):
    torch.manual_seed(0)
    layer, bn = make(3, **options).double(), TORCH_BN[rank](3, **options).double()
    randomize(layer, bn)
    for step in range(3):
        x = torch.randn(shape_of(rank), dtype=torch.float64) * (step + 1) + step
        torch.testing.assert_close(layer(x), bn(x))
    torch.testing.assert_close(layer.state_dict(), bn.state_dict())
    layer.eval(), bn.eval()
    x = torch.randn(shape_of(rank), dtype=torch.float64)
    torch.testing.assert_close(layer(x), bn(x))


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_gradcheck_in_float64(make, rank):
    torch.manual_seed(0)
    layer = make(2).double()
    randomize(layer)
    x = torch.randn((4, 2) + (3, 2, 2)[: rank - 2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: layer(x), (x, layer.weight, layer.bias), eps=1e-6, atol=1e-5,
        fast_mode=True,
    )


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_gives_half_output_and_float32_statistics(make, dtype):
    torch.manual_seed(0)
    layer = make(3)
    x = torch.randn(8, 3, 4, 4)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    assert layer.running_mean.dtype == torch.float32
    reference = make(3)
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(y.float(), reference(x.to(dtype).float()), atol=tol, rtol=tol)
    torch.testing.assert_close(layer.running_var, reference.running_var, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("rank", [4, 5])
def test_channels_last_input_gives_the_same_values_in_channels_last(make, rank):
    torch.manual_seed(0)
    fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
    layer, reference = make(3), make(3)
    x = torch.randn(shape_of(rank))
    y = layer(x.to(memory_format=fmt))
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, reference(x))
    torch.testing.assert_close(layer.state_dict(), reference.state_dict())


# --------------------------------------------------------------------------- bad input
def bad_inputs():
    return {
        "wrong channel count": (torch.randn(4, 5, 3), "expected 3 channels"),
        "rank 1": (torch.randn(3), "rank 2 to 5"),
        "rank 6": (torch.randn(2, 3, 2, 2, 2, 2), "rank 2 to 5"),
        "one value per channel": (torch.randn(1, 3), "more than 1 value per channel"),
        "NaN": (torch.randn(4, 3, 2).index_put_((torch.tensor([1]),), torch.tensor(float("nan"))),
                "NaN"),
    }


@pytest.mark.parametrize(
    "make", [ghost_whole, ghost_groups, ghost_strided_unequal, domain_one, domain_ids]
)
@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_raises_naming_the_layer_and_leaves_state_unchanged(make, case):
    layer = make(3)
    layer._rethinkbn_name = "head.bn"
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x, expected = bad_inputs()[case]
    with pytest.raises((ValueError, TypeError), match=expected) as info:
        layer(x)
    assert "'head.bn'" in str(info.value)
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("case", ["wrong channel count", "rank 1", "rank 6"])
def test_frozen_rejects_bad_shapes_naming_the_layer(case):
    layer = FrozenBatchNorm(3)
    layer._rethinkbn_name = "stem.bn"
    x, expected = bad_inputs()[case]
    with pytest.raises(ValueError, match=expected) as info:
        layer(x)
    assert "'stem.bn'" in str(info.value)


def test_is_batchnorm_recognizes_torch_and_rethinkbn_layers():
    for layer in (nn.BatchNorm1d(2), nn.BatchNorm3d(2), nn.SyncBatchNorm(2), GhostBatchNorm(2),
                  FrozenBatchNorm(2), DomainBatchNorm(2, 2)):
        assert is_batchnorm(layer)
        assert isinstance(layer, (nn.modules.batchnorm._BatchNorm, BatchNormBase))
    for layer in (nn.GroupNorm(1, 2), nn.LayerNorm(2), nn.InstanceNorm2d(2), nn.Conv2d(2, 2, 1)):
        assert not is_batchnorm(layer)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GhostBatchNorm(3, norm_batch_size=4),
        lambda: GhostBatchNorm(3, norm_batch_size=4, grouping="strided"),
        lambda: GhostBatchNorm(3, norm_batch_size=3),
        lambda: FrozenBatchNorm(3),
        lambda: DomainBatchNorm(3, 1),
    ],
)
def test_output_can_feed_an_inplace_relu_like_torch_bn(make):
    layer = make()
    x = torch.randn(8, 3, 5, requires_grad=True)
    kwargs = {"domain": 0} if isinstance(layer, DomainBatchNorm) else {}
    y = layer(x, **kwargs)
    expected = torch.autograd.grad(y.clamp_min(0).sum(), x, retain_graph=True)[0]
    torch.relu_(y).sum().backward()
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("cls", [GhostBatchNorm, FrozenBatchNorm, DomainBatchNorm])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_features": 0}, "num_features must be a positive int, got 0"),
        ({"num_features": True}, "num_features must be a positive int, got True"),
        ({"eps": 0.0}, r"eps must be > 0, got 0.0"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\] or None, got 1.5"),
    ],
)
def test_bad_constructor_arguments_name_the_class_and_the_value(cls, kwargs, message):
    args = {"num_features": 3, **kwargs}
    extra = {"num_domains": 2} if cls is DomainBatchNorm else {}
    with pytest.raises(ValueError, match=f"{cls.__name__}: {message}"):
        cls(**args, **extra)
