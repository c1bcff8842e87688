"""Shuffling across devices: the plan, its inverse, its gradient, and the shuffled head.

The reference is always the obvious one: index the concatenated global batch with the plan's
permutation, cut it into the devices' shares, and run torch's BatchNorm on each share in a loop.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from gloo_world import GlooWorld
from rethinkbn.convert import revert_batchnorm
from rethinkbn.distributed import (
    PerDeviceBatchNorm,
    ShuffledModule,
    ShufflePlan,
    shuffle_permutation,
    virtual_devices,
)


def global_batch(sizes, tail=(3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((sum(sizes), *tail), generator=g, dtype=torch.float64)


def shares(t, sizes):
    return list(torch.split(t, list(sizes)))


def per_device_bn_loop(x, sizes):
    """torch's BatchNorm on each device's share of ``x``, one device at a time."""
    outs = []
    for part in shares(x, sizes):
        bn = nn.BatchNorm1d(x.size(1), dtype=x.dtype)
        outs.append(bn(part))
    return torch.cat(outs)


# ------------------------------------------------------------------------------ the permutation
def test_permutation_depends_only_on_seed_and_step():
    assert torch.equal(shuffle_permutation(10, 3, 7), shuffle_permutation(10, 3, 7))
    assert not torch.equal(shuffle_permutation(50, 3, 7), shuffle_permutation(50, 3, 8))
    assert not torch.equal(shuffle_permutation(50, 3, 7), shuffle_permutation(50, 4, 7))
    assert sorted(shuffle_permutation(10, 0, 0).tolist()) == list(range(10))


# ------------------------------------------------------------------------------ virtual devices
@settings(max_examples=20, deadline=None)
@given(devices=st.integers(1, 4), per_device=st.integers(1, 4), step=st.integers(0, 100))
def test_virtual_shuffle_then_unshuffle_is_the_identity(devices, per_device, step):
    x = global_batch([devices * per_device])
    plan = ShufflePlan.virtual(x.size(0), devices, seed=1, step=step)
    assert torch.equal(plan.shuffle(x), x[plan.perm])
    assert torch.equal(plan.unshuffle(plan.shuffle(x)), x)


def test_virtual_shuffle_gradient_is_the_inverse_permutation():
    x = global_batch([6]).requires_grad_()
    plan = ShufflePlan.virtual(6, 3, seed=0, step=0)
    torch.autograd.gradcheck(plan.shuffle, (x,))
    torch.autograd.gradcheck(plan.unshuffle, (x,))


def test_virtual_plan_needs_equal_devices():
    with pytest.raises(ValueError, match="7 samples does not split into 2 equal virtual devices"):
        ShufflePlan.virtual(7, 2, seed=0, step=0)



@pytest.mark.parametrize("devices", [0, 1.5, True])
def test_virtual_devices_must_be_a_positive_int(devices):
    error = ValueError if type(devices) is int else TypeError  # a bool is not a count
    with pytest.raises(error, match=rf"num_devices must be a positive int, got {devices!r}"):
        ShufflePlan.virtual(4, devices, seed=0, step=0)
    with pytest.raises(error, match=rf"num_devices must be a positive int or None, "
                                         rf"got {devices!r}"):
        ShuffledModule(nn.Identity(), num_devices=devices)

def test_per_device_bn_normalizes_each_virtual_device_alone():
    x = global_batch([12], tail=(3, 4)).float()
    layer = PerDeviceBatchNorm(3, num_devices=3)
    expected = per_device_bn_loop(x, [4, 4, 4])
    assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)



def test_per_device_bn_refusing_an_input_is_left_as_it_was():
    layer = PerDeviceBatchNorm(3, num_devices=2, norm_batch_size=5)
    with pytest.raises(ValueError, match="expected 3 channels"):
        layer(torch.randn(4, 2, 6))
    assert layer.norm_batch_size == 5

def test_virtual_devices_converts_every_batchnorm_and_reverts():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    weight = model[1].weight
    virtual_devices(model, 2)
    assert isinstance(model[1], PerDeviceBatchNorm) and model[1].num_devices == 2
    revert_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm1d and model[1].weight is weight


def test_shuffled_module_on_virtual_devices_equals_the_loop_over_shuffled_shares():
    x = global_batch([8]).float().requires_grad_()
    head = ShuffledModule(virtual_devices(nn.Sequential(nn.BatchNorm1d(3)), 4), seed=5,
                          num_devices=4)
    y = head(x)
    perm = shuffle_permutation(8, 5, 0)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = per_device_bn_loop(x_ref[perm], [2] * 4)[torch.argsort(perm)]
    assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_shuffled_module_uses_a_new_permutation_every_training_step():
    head = ShuffledModule(nn.Identity(), seed=0, num_devices=2)
    x = global_batch([40])
    plans = [head.plan(x)]
    head(x)
    plans.append(head.plan(x))
    assert head.step == 1 and not torch.equal(plans[0].perm, plans[1].perm)


def test_shuffled_module_in_eval_is_the_inner_module():
    inner = virtual_devices(nn.Sequential(nn.BatchNorm1d(3)), 2).eval()
    head = ShuffledModule(inner, num_devices=2).eval()
    x = global_batch([4]).float()
    assert torch.equal(head(x), inner(x)) and head.step == 0


def test_shuffled_module_refuses_an_inner_module_that_changes_the_batch():
    head = ShuffledModule(nn.Flatten(0), num_devices=1)
    with pytest.raises(TypeError, match="expected the inner module to return one tensor with 4"):
        head(global_batch([4]))


# ------------------------------------------------------------------------------ across ranks
@pytest.fixture(scope="module")
def world3():
    with GlooWorld(3) as world:
        yield world


def run_plan(sizes, give_sizes):
    """On every rank: shuffle, unshuffle and their gradients for this rank's share."""
    rank = dist.get_rank()
    x = shares(global_batch(sizes), sizes)[rank].clone().requires_grad_()
    weights = shares(global_batch(sizes, seed=1), sizes)[rank]
    plan = ShufflePlan.across_ranks(sizes[rank], seed=3, step=2,
                                    sizes=sizes if give_sizes else None)
    shuffled = plan.shuffle(x)
    (shuffled * weights).sum().backward()
    restored = plan.unshuffle(shuffled.detach())
    y = shuffled.detach().clone().requires_grad_()
    (plan.unshuffle(y) * weights).sum().backward()
    return {"shuffled": shuffled.detach(), "restored": restored, "grad_shuffle": x.grad,
            "grad_unshuffle": y.grad, "sent": plan.route.send_counts,
            "received": plan.route.recv_counts}


sizes_3 = st.lists(st.integers(0, 4), min_size=3, max_size=3).filter(lambda s: sum(s) > 0)


@settings(max_examples=8, deadline=None)
@given(sizes=sizes_3, give_sizes=st.booleans())
def test_shuffle_across_ranks_moves_each_sample_to_its_shuffled_position(world3, sizes,
                                                                         give_sizes):
    results = world3.run(run_plan, sizes, give_sizes)
    x = global_batch(sizes)
    perm = shuffle_permutation(sum(sizes), 3, 2)
    assert torch.equal(torch.cat([r["shuffled"] for r in results]), x[perm])
    assert torch.equal(torch.cat([r["restored"] for r in results]), x)


@settings(max_examples=5, deadline=None)
@given(sizes=sizes_3)
def test_shuffle_and_unshuffle_gradients_are_the_inverse_exchanges(world3, sizes):
    results = world3.run(run_plan, sizes, True)
    weights = global_batch(sizes, seed=1)
    perm = shuffle_permutation(sum(sizes), 3, 2)
    # d/dx sum(w * x[perm]) = w[argsort(perm)];  d/dy sum(w * y[argsort(perm)]) = w[perm]
    assert torch.equal(torch.cat([r["grad_shuffle"] for r in results]),
                       weights[torch.argsort(perm)])
    assert torch.equal(torch.cat([r["grad_unshuffle"] for r in results]), weights[perm])


def test_each_rank_sends_and_receives_only_its_own_share(world3):
    sizes = [5, 0, 7]
    for rank, r in enumerate(world3.run(run_plan, sizes, True)):
        assert sum(r["sent"]) == sizes[rank] and sum(r["received"]) == sizes[rank]


def run_shuffled_head(sizes, step_count):
    rank = dist.get_rank()
    head = ShuffledModule(nn.BatchNorm1d(3, dtype=torch.float64), seed=9)
    outs = []
    for _ in range(step_count):
        x = shares(global_batch(sizes), sizes)[rank].clone().requires_grad_()
        y = head(x)
        y.backward(shares(global_batch(sizes, seed=2), sizes)[rank])
        outs.append({"y": y.detach(), "dx": x.grad})
    return outs


def test_shuffled_head_across_ranks_equals_the_loop_over_shuffled_shares(world3):
    sizes = [4, 2, 6]
    results = world3.run(run_shuffled_head, sizes, 2)
    for step in range(2):
        x = global_batch(sizes).requires_grad_()
        perm = shuffle_permutation(sum(sizes), 9, step)
        y = per_device_bn_loop(x[perm], sizes)[torch.argsort(perm)]
        y.backward(global_batch(sizes, seed=2))
        assert_close(torch.cat([r[step]["y"] for r in results]), y)
        assert_close(torch.cat([r[step]["dx"] for r in results]), x.grad)


def test_virtual_plan_moves_samples_exactly_as_the_plan_across_as_many_ranks(world3):
    sizes = [3, 3, 3]
    results = world3.run(run_plan, sizes, True)
    x = global_batch(sizes)
    virtual = ShufflePlan.virtual(9, 3, seed=3, step=2)
    assert torch.equal(torch.cat([r["shuffled"] for r in results]), virtual.shuffle(x))


def test_shuffled_module_does_not_advance_when_the_forward_raises():
    head = ShuffledModule(nn.BatchNorm1d(3), num_devices=2)
    with pytest.raises(RuntimeError, match="running_mean should contain 5"):
        head(torch.randn(4, 5))  # wrong channel count: the inner BatchNorm raises
    assert head.step == 0
    with pytest.raises(TypeError):
        ShuffledModule(nn.Flatten(0), num_devices=1)(global_batch([4]))
    head(torch.randn(4, 3))
    assert head.step == 1


def plan_on_a_device_gloo_cannot_use():
    # The sizes travel where the backend takes them (CPU for gloo), whatever device the data is
    # on; the route's indexes are moved to that device once, when the plan is made.
    plan = ShufflePlan.across_ranks(2, seed=0, step=0, device="meta")
    return plan.sizes, plan.route.send_index.device.type, plan.route.recv_index.device.type


def test_plan_across_ranks_exchanges_sizes_where_the_backend_takes_them(world3):
    for sizes, send, recv in world3.run(plan_on_a_device_gloo_cannot_use):
        assert sizes == (2, 2, 2) and send == recv == "meta"


def run_penalty_through_the_shuffle(sizes):
    rank = dist.get_rank()
    x = shares(global_batch(sizes), sizes)[rank].clone().requires_grad_()
    w = shares(global_batch(sizes, seed=1), sizes)[rank]
    plan = ShufflePlan.across_ranks(sizes[rank], seed=3, step=2, sizes=sizes)
    (g,) = torch.autograd.grad((plan.shuffle(x).pow(3) * w).sum(), x, create_graph=True)
    g.square().sum().backward()
    return x.grad


def test_second_derivatives_flow_through_the_exchange(world3):
    sizes = [2, 3, 1]
    got = torch.cat(world3.run(run_penalty_through_the_shuffle, sizes))
    x = global_batch(sizes).requires_grad_()
    w = global_batch(sizes, seed=1)
    perm = shuffle_permutation(sum(sizes), 3, 2)
    (g,) = torch.autograd.grad((x[perm].pow(3) * w).sum(), x, create_graph=True)
    g.square().sum().backward()
    assert_close(got, x.grad)
