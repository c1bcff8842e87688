"""SyncBatchNorm with nothing to sync (no process group) is torch's BatchNorm, at torch's cost.

Issue 21: the layer used to build float64 two-pass moments and run its own normalize function
there (2.7x torch's op calls). It now runs torch's kernel: outputs and gradients are bit-identical
to ``torch.nn.BatchNorm`` on the same batch, the running buffers equal torch's to rounding, and a
training step makes a handful of small per-channel ops beyond torch's. The family's promises stay:
a non-finite batch is skipped per channel (tests/test_nan_policy.py), ``momentum=None`` averages
the finite batches (tests/test_nan_cumulative_average.py), double backward is exact
(tests/test_sync_adversarial.py), and what a step changes is checked before it changes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from op_counts import CountOps
from rethinkbn.distributed import SyncBatchNorm

TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}




def pair(channels, dtype=torch.float32, rank=3, **options):
    """Our layer and torch's for inputs of ``rank``, with the same random affine parameters and
    running buffers."""
    ours, theirs = SyncBatchNorm(channels, **options), TORCH_BN[rank](channels, **options)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in theirs.named_parameters():
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            getattr(ours, name).copy_(t)
        if theirs.running_mean is not None:
            theirs.running_mean.normal_(generator=g)
            theirs.running_var.uniform_(0.5, 2, generator=g)
            ours.running_mean.copy_(theirs.running_mean)
            ours.running_var.copy_(theirs.running_var)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return ours.to(param_dtype), theirs.to(param_dtype)


def step(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    tail=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    momentum=st.sampled_from([0.1, 1.0, None]),
    affine=st.booleans(),
    track=st.booleans(),
    seed=st.integers(0, 3),
)
def test_a_training_step_is_bit_identical_to_torch_batchnorm(n, tail, dtype, momentum, affine,
                                                              track, seed):
    if n * max(1, torch.Size(tail).numel()) < 2:
        n = 2  # one value per channel: both raise (tests below)
    shape = (n, 2, *tail)
    ours, theirs = pair(2, dtype, len(shape), momentum=momentum, affine=affine,
                        track_running_stats=track)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
        dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        (y, dx, grads), (y_t, dx_t, grads_t) = step(ours, x, dy), step(theirs, x, dy)
        if dtype in (torch.float16, torch.bfloat16) and not (affine or track):
            # torch has no float32 tensor to compute in here and runs in half precision; the
            # layer promises float32 math: torch's on the float32 input, rounded
            (y_t, dx_t, _) = step(theirs, x.float(), dy.float())
            assert_close(y, y_t.to(dtype)), assert_close(dx, dx_t.to(dtype))
            continue
        assert y.dtype == y_t.dtype and torch.equal(y, y_t)
        assert torch.equal(dx, dx_t)
        assert grads.keys() == grads_t.keys()
        for key, value in grads_t.items():
            assert torch.equal(grads[key], value)
        ours.zero_grad(), theirs.zero_grad()
    for key, value in theirs.state_dict().items():
        # torch blends in its kernel ((1 - m) * old + m * new), we lerp: equal to rounding
        assert_close(ours.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_eval_without_running_buffers_normalizes_the_batch_like_torch():
    ours, theirs = pair(3, track_running_stats=False)
    x = torch.randn(5, 3, 4)
    assert torch.equal(ours.eval()(x), theirs.eval()(x))


def test_a_training_step_makes_torch_s_ops_and_a_few_per_channel_ones():
    # Regression (issue 21): 2.7x torch's op calls and ~20 float64 casts per layer and step.
    x = torch.randn(16, 8, 10, requires_grad=True)
    counts = {}
    for cls in (SyncBatchNorm, nn.BatchNorm1d):
        layer = cls(8)
        layer(x).sum().backward()  # warm-up
        with CountOps() as mode:
            layer(x).sum().backward()
        counts[cls] = mode
    ours, theirs = counts[SyncBatchNorm], counts[nn.BatchNorm1d]
    assert ours.float64 == 0
    extra = ours.ops.copy()
    extra.subtract(theirs.ops)
    assert all(v >= 0 for v in extra.values()), extra  # every op torch runs, we run
    # torch's kernel blends the running buffers; beyond it: a (2, C) copy of them to restore
    # if a statistic is not finite, and one dot product read on the host that says whether
    assert sum(extra.values()) <= 3, extra
    assert ours.ops["aten.native_batch_norm_backward"] == 1


def test_a_batch_with_one_value_per_channel_raises_naming_the_layer_and_changes_nothing():
    layer = SyncBatchNorm(3)
    layer._rethinkbn_name = "head.bn"
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for x in (torch.randn(1, 3), torch.randn(0, 3, 4)):
        with pytest.raises(ValueError, match=r"'head.bn'.*more than 1 value per channel"):
            layer(x)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_a_non_finite_batch_leaves_the_buffers_and_the_next_step_is_torch_s():
    ours, theirs = pair(3)
    x = torch.randn(6, 3, 2)
    bad = x.clone()
    bad[2, 1, 0] = float("inf")
    ours(bad)
    assert ours.nonfinite_count.tolist() == [0, 1, 0]
    assert ours.num_batches_tracked == 1  # channels 0 and 2 took the batch
    fresh, _ = pair(3)
    fresh(x)  # channel 1 unchanged, channels 0 and 2 took the batch
    assert torch.equal(ours.running_mean[1], pair(3)[0].running_mean[1])
    assert_close(ours.running_mean[[0, 2]], fresh.running_mean[[0, 2]], rtol=1e-6, atol=1e-7)
    theirs(bad)  # torch's buffers are poisoned on channel 1, ours are not
    assert not torch.isfinite(theirs.running_var[1])


def test_an_observer_still_receives_float64_moments_of_the_batch():
    layer = SyncBatchNorm(3)
    seen = []
    layer.observer = lambda module, moments: seen.append(moments)
    x = torch.randn(6, 3, 4, dtype=torch.float64).float() * 1e-2 + 1e4
    layer(x)
    exact = x.double()
    assert seen[0].mean.dtype == torch.float64
    assert_close(seen[0].mean, exact.mean((0, 2)), rtol=0, atol=1e-8)  # float32: 5e-4
    assert_close(seen[0].var(unbiased=True), exact.var((0, 2)), rtol=1e-6, atol=0)
