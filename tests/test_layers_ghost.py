"""GhostBatchNorm against the obvious reference: a Python loop over groups of torch BatchNorm."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rethinkbn.layers import GhostBatchNorm
from rethinkbn.layers.functional import group_index, group_sizes
from rethinkbn.stats import Moments


def loop_over_groups(x, norm_batch_size, grouping, weight, bias, eps=1e-5):
    """Output and per-group (mean, unbiased var, samples) by calling torch's BN once per group."""
    sizes = group_sizes(x.size(0), norm_batch_size)
    index = group_index(x.size(0), sizes, grouping)
    outputs, stats = [None] * x.size(0), []
    for g in range(len(sizes)):
        members = (index == g).nonzero().flatten()
        mean, var = torch.zeros(x.size(1), dtype=x.dtype), torch.ones(x.size(1), dtype=x.dtype)
        y = F.batch_norm(x[members], mean, var, weight, bias, True, 1.0, eps)
        for i, row in zip(members.tolist(), y, strict=True):
            outputs[i] = row
        stats.append((mean, var, len(members)))
    return torch.stack(outputs), stats


def running_reference(stats, momentum=0.1, steps_before=None):
    """Torch's update from the sample-weighted average of the group statistics, from (0, 1)."""
    n = sum(s for _, _, s in stats)
    mean = sum(m * s for m, _, s in stats) / n
    var = sum(v * s for _, v, s in stats) / n
    return momentum * mean, (1 - momentum) + momentum * var


def make_layer(c, nbs, grouping, dtype=torch.float64):
    layer = GhostBatchNorm(c, nbs, grouping=grouping, dtype=dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    return layer


@settings(max_examples=20, deadline=None)
@given(
    rank=st.integers(2, 5),
    n=st.integers(2, 13),
    nbs=st.integers(1, 14),
    grouping=st.sampled_from(["contiguous", "strided"]),
    seed=st.integers(0, 100),
)
def test_equals_a_loop_over_groups_in_outputs_gradients_and_buffers(rank, n, nbs, grouping, seed):
    torch.manual_seed(seed)
    shape = (n, 3) + (3, 2, 2)[: rank - 2]
    # One value per channel in a group is an error, tested below.
    assume(rank > 2 or n // len(group_sizes(n, nbs)) >= 2)
    layer = make_layer(3, nbs, grouping)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)

    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref, stats = loop_over_groups(x_ref, nbs, grouping, weight, bias)
    y_ref.backward(grad)

    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(layer.weight.grad, weight.grad, **tol)
    torch.testing.assert_close(layer.bias.grad, bias.grad, **tol)
    mean, var = running_reference(stats)
    torch.testing.assert_close(layer.running_mean, mean, **tol)
    torch.testing.assert_close(layer.running_var, var, **tol)
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize(
    ("n", "nbs", "sizes"),
    [(12, 4, [4, 4, 4]), (10, 4, [4, 4, 2]), (9, 4, [4, 5]), (3, 8, [3]), (5, None, [5]),
     (7, 1, [1] * 7)],
)
def test_remainder_forms_its_own_group_or_joins_the_previous_one(n, nbs, sizes):
    assert group_sizes(n, nbs) == sizes


def test_strided_grouping_puts_sample_i_in_group_i_mod_g():
    assert group_index(10, group_sizes(10, 4), "strided").tolist() == [0, 1, 2] * 3 + [0]
    assert group_index(10, group_sizes(10, 4), "contiguous").tolist() == [0] * 4 + [1] * 4 + [2] * 2


def test_unequal_groups_weigh_running_statistics_by_their_sample_count():
    torch.manual_seed(0)
    layer = make_layer(2, 4, "contiguous")
    x = torch.randn(10, 2, 3, dtype=torch.float64)
    layer(x)
    groups = [x[:4], x[4:8], x[8:]]
    mean = sum(g.mean((0, 2)) * len(g) for g in groups) / 10
    var = sum(g.var((0, 2), correction=1) * len(g) for g in groups) / 10
    torch.testing.assert_close(layer.running_mean, 0.1 * mean)
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * var)


@pytest.mark.parametrize("grouping", ["contiguous", "strided"])
def test_whole_batch_equals_torch_batchnorm(grouping):
    torch.manual_seed(0)
    for nbs in (None, 16, 100):
        layer = GhostBatchNorm(3, nbs, grouping=grouping)
        bn = torch.nn.BatchNorm2d(3)
        for _ in range(2):
            x = torch.randn(16, 3, 4, 4)
            torch.testing.assert_close(layer(x), bn(x))
        torch.testing.assert_close(layer.state_dict(), bn.state_dict())


def test_eval_uses_running_statistics_never_groups():
    torch.manual_seed(0)
    layer = make_layer(3, 2, "contiguous", dtype=torch.float32)
    for _ in range(3):
        layer(torch.randn(8, 3, 4, 4))
    layer.eval()
    x = torch.randn(8, 3, 4, 4)
    expected = F.batch_norm(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, 1e-5
    )
    before = layer.state_dict()
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.state_dict(), before)


def test_momentum_none_gives_the_cumulative_average_of_step_statistics():
    torch.manual_seed(0)
    layer = GhostBatchNorm(2, 3, momentum=None, dtype=torch.float64)
    xs = [torch.randn(6, 2, 5, dtype=torch.float64) + i for i in range(3)]
    for x in xs:
        layer(x)
    steps = [torch.stack([x[:3].mean((0, 2)), x[3:].mean((0, 2))]).mean(0) for x in xs]
    torch.testing.assert_close(layer.running_mean, torch.stack(steps).mean(0))
    assert int(layer.num_batches_tracked) == 3


def test_norm_batch_size_and_grouping_are_mutable_attributes():
    torch.manual_seed(0)
    layer = GhostBatchNorm(3, 2)
    x = torch.randn(8, 3, 2)
    grouped = layer(x)
    layer.norm_batch_size = None
    torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, training=True))
    layer.norm_batch_size, layer.grouping = 2, "strided"
    strided = layer(x)
    assert not torch.allclose(grouped, strided)
    torch.testing.assert_close(strided[[0, 4]], F.batch_norm(x[[0, 4]], None, None, training=True))


@pytest.mark.parametrize(
    ("n", "nbs", "grouping"),
    [(8, 2, "contiguous"), (8, 2, "strided"), (7, 2, "contiguous"), (7, 3, "strided")],
)
def test_gradcheck_of_every_grouping_path(n, nbs, grouping):
    torch.manual_seed(0)
    layer = make_layer(2, nbs, grouping)
    x = torch.randn(n, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: layer(x), (x, layer.weight, layer.bias), eps=1e-6, atol=1e-5
    )


def test_observer_receives_the_moments_of_the_whole_batch():
    torch.manual_seed(0)
    layer = GhostBatchNorm(3, 2)
    seen = []
    layer.observer = lambda module, moments: seen.append((module, moments))
    x = torch.randn(8, 3, 4)
    layer(x)
    layer.eval()
    layer(x)
    assert len(seen) == 1 and seen[0][0] is layer
    expected = Moments.of(x)
    # both are float64 moments of float32 data, each exact to float32 rounding
    torch.testing.assert_close(seen[0][1].mean, expected.mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(seen[0][1].m2, expected.m2, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("grouping", ["contiguous", "strided"])
@pytest.mark.parametrize("n", [8, 9, 10])
def test_observer_gets_the_whole_batch_moments_from_groups_of_any_size(grouping, n):
    torch.manual_seed(0)
    layer = GhostBatchNorm(3, 4, grouping=grouping)
    seen = []
    layer.observer = lambda module, moments: seen.append(moments)
    x = torch.randn(n, 3, 5) * 3 + 5
    layer(x)
    expected = Moments.of(x)
    assert torch.equal(seen[0].count, expected.count)
    # the group statistics are the float32 ones the layer normalized with
    torch.testing.assert_close(seen[0].mean, expected.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen[0].m2, expected.m2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("nbs", [0, -3])
def test_norm_batch_size_below_one_is_rejected_with_the_value(nbs):
    with pytest.raises(ValueError, match=f"norm_batch_size must be a positive int.*got {nbs}"):
        GhostBatchNorm(3, nbs)
    layer = GhostBatchNorm(3, 2)
    layer._rethinkbn_name = "block.bn"
    layer.norm_batch_size = nbs
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="'block.bn'.*norm_batch_size must be a positive int"):
        layer(torch.randn(4, 3))
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_a_group_with_one_value_per_channel_is_rejected():
    layer = GhostBatchNorm(3, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel.*got 1"):
        layer(torch.randn(4, 3))
    assert int(layer.num_batches_tracked) == 0


def test_unknown_grouping_is_rejected():
    with pytest.raises(ValueError, match="GhostBatchNorm: grouping must be one of.*'random'"):
        GhostBatchNorm(3, 2, grouping="random")
    layer = GhostBatchNorm(3, 2)
    layer._rethinkbn_name = "block.bn"
    layer.grouping = "random"
    with pytest.raises(ValueError, match="'block.bn'.*grouping must be one of.*'random'"):
        layer(torch.randn(4, 3))
    assert int(layer.num_batches_tracked) == 0
