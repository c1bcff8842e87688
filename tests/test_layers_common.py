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
    "kwargs, error, message",
    [
        ({"num_features": 0}, ValueError, "num_features must be a positive int, got 0"),
        ({"num_features": True}, TypeError, "num_features must be a positive int, got True"),
        ({"eps": 0.0}, ValueError, r"eps must be > 0, got 0.0"),
        ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\] or None, got 1.5"),
    ],
)
def test_bad_constructor_arguments_name_the_class_and_the_value(cls, kwargs, error, message):
    args = {"num_features": 3, **kwargs}
    extra = {"num_domains": 2} if cls is DomainBatchNorm else {}
    with pytest.raises(error, match=f"{cls.__name__}: {message}"):
        cls(**args, **extra)


# --------------------------------------------------------------------------- issue 9, items 3, 5, 6
from bn_reference import contiguous_groups, loop_batch_norm, strided_groups  # noqa: E402

GROUPING_PATHS = {
    "whole": (None, "contiguous"),
    "equal contiguous": (2, "contiguous"),
    "equal strided": (2, "strided"),
    "unequal contiguous": (3, "contiguous"),
    "unequal strided": (3, "strided"),
}


def groups_of(n, nbs, grouping):
    return (contiguous_groups if grouping == "contiguous" else strided_groups)(n, nbs)


@pytest.mark.parametrize("path", list(GROUPING_PATHS))
def test_gradient_penalty_through_ghost_equals_a_loop_of_torch_bn(path):
    # Regression (issue 9 item 3): the fused contiguous path's second derivatives were wrong.
    nbs, grouping = GROUPING_PATHS[path]
    torch.manual_seed(0)
    x = torch.randn(8, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    layer = GhostBatchNorm(3, nbs, grouping=grouping, dtype=torch.float64)

    def penalty(y):
        (gx,) = torch.autograd.grad((y.sin() * torch.arange(y.numel()).view_as(y)).sum(), x,
                                    create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, w, b))

    mine = penalty(torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,)))
    expected = penalty(loop_batch_norm(x, groups_of(8, nbs, grouping), w, b, layer.eps)[0])
    for a, e in zip(mine, expected, strict=True):
        torch.testing.assert_close(a, e)
    f = lambda x, w, b: torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("path", list(GROUPING_PATHS))
def test_large_mean_small_spread_is_at_least_as_accurate_as_torch(path):
    # Regression (issue 9 item 5): the fused path's float32 mean gave 0.19 against torch's 0.10.
    nbs, grouping = GROUPING_PATHS[path]
    torch.manual_seed(0)
    x = 1e4 + 1e-2 * torch.randn(30 if "unequal" in path else 32, 4, 50)
    if nbs is not None:
        nbs *= 4
    groups = groups_of(x.size(0), nbs, grouping)
    exact = loop_batch_norm(x.double(), groups, None, None, 1e-5)[0]
    torch_error = (loop_batch_norm(x, groups, None, None, 1e-5)[0].double() - exact).abs().max()
    mine = GhostBatchNorm(4, nbs, grouping=grouping)(x)
    assert (mine.double() - exact).abs().max() <= torch_error + 1e-6


# validate=False (and a compiled model) normalize per-sample domains in one vectorized pass
# (masked_domain_norm), validate=True with torch's kernel per domain: both as accurate as torch.
@pytest.mark.parametrize("validate", [True, False])
def test_large_mean_small_spread_with_domain_ids_is_at_least_as_accurate_as_torch(validate):
    torch.manual_seed(0)
    x = 1e4 + 1e-2 * torch.randn(32, 4, 50)
    ids = torch.randint(0, 3, (32,))
    groups = [[i for i in range(32) if ids[i] == d] for d in range(3)]
    exact = loop_batch_norm(x.double(), groups, None, None, 1e-5)[0]
    torch_error = (loop_batch_norm(x, groups, None, None, 1e-5)[0].double() - exact).abs().max()
    mine = DomainBatchNorm(4, 3, validate=validate)(x, ids)
    assert (mine.double() - exact).abs().max() <= torch_error + 1e-6


MODES = {"train": True, "eval": False}


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input_raises_a_type_error_naming_the_layer(make, mode, dtype):
    # Regression (issue 9 item 6): Frozen, Ghost and Domain (eval) returned truncated int64.
    layer = make(3).train(MODES[mode])
    layer._rethinkbn_name = "head.bn"
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match=f"'head.bn'.*floating-point input, got dtype {dtype}"):
        layer((torch.randn(4, 3, 2) * 3).to(dtype))
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    "x_dtype, layer_dtype",
    [(torch.float64, torch.float32), (torch.float32, torch.float64),
     (torch.float16, torch.float64)],
)
def test_input_dtype_torch_refuses_raises_naming_the_layer(make, mode, x_dtype, layer_dtype):
    # torch raises "mixed dtype" for these (train and eval); so do we, with the layer's name.
    layer = make(3, dtype=layer_dtype).train(MODES[mode])
    layer._rethinkbn_name = "head.bn"
    bn = nn.BatchNorm1d(3, dtype=layer_dtype).train(MODES[mode])
    with pytest.raises(RuntimeError, match="mixed dtype"):
        bn(torch.randn(4, 3, 2, dtype=x_dtype))
    with pytest.raises(TypeError, match=f"'head.bn'.*dtype {layer_dtype}.*got {x_dtype}"):
        layer(torch.randn(4, 3, 2, dtype=x_dtype))


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_input_into_a_float32_layer_is_accepted_like_torch(make, x_dtype):
    layer = make(3)
    assert layer(torch.randn(4, 3, 2, dtype=x_dtype)).dtype == x_dtype
    assert layer.eval()(torch.randn(4, 3, 2, dtype=x_dtype)).dtype == x_dtype


@pytest.mark.parametrize("value", ["x", 1, None])
def test_frozen_affine_trainable_must_be_a_bool(value):
    # Regression (issue 9 item 12): affine_trainable="x" was accepted.
    with pytest.raises(TypeError, match=f"affine_trainable must be a bool, got {value!r}"):
        FrozenBatchNorm(3, affine_trainable=value)


@pytest.mark.parametrize("mode", list(MODES))
def test_sync_bn_refuses_integer_and_mixed_float_input_naming_the_layer(mode):
    # Issue 9 item 6: SyncBatchNorm (train) returned truncated int64; it shares _check_input.
    from rethinkbn.distributed import SyncBatchNorm

    layer = SyncBatchNorm(3).train(MODES[mode])
    layer._rethinkbn_name = "head.bn"
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match="'head.bn'.*floating-point input, got dtype torch.int64"):
        layer(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="'head.bn'.*got torch.float64"):
        layer(torch.randn(4, 3, dtype=torch.float64))
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
