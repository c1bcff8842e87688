"""SyncBatchNorm and the cross-rank moments under adversarial use: exact or a clear error.

* Second derivatives (gradient penalties, ``create_graph=True``) equal torch's BatchNorm on the
  concatenated batch, with 1 and 2 ranks.
* Ranks that disagree on a layer's channel count, dtype or number of layers all fail with an
  error that says what differs (2 and 3 real gloo ranks), instead of one rank going on with
  garbage while the others wait for the timeout.
* Integer inputs and inputs of another dtype than the layer's raise ``TypeError`` naming the
  layer.

The rank functions catch the expected error and return its text, so one gloo world serves every
scenario (a rank that raises would mark the world unusable).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import test_sync_bn
from rethinkbn.distributed import SyncBatchNorm
from rethinkbn.stats import Moments, all_gather_moments, all_reduce_moments

# The gloo worlds of 2 and 3 ranks (module-scoped fixtures, one world per module).
world2, world3 = test_sync_bn.world2, test_sync_bn.world3


def error_text(fn, *args):
    try:
        fn(*args)
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------------------ double backward
# (gradgradcheck with affine parameters: tests/test_sync_bn.py)
def test_double_backward_without_affine_passes_gradgradcheck():
    layer = SyncBatchNorm(2, affine=False, track_running_stats=False, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(layer, (x,))


def penalty_batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 4, dtype=torch.float64, generator=g) * 2 + 1
    c = torch.randn(7, 3, dtype=torch.float64, generator=g)
    return x, c


def gradient_penalty(bn_cls, rows):
    """Linear -> BN; backward of ||d(sum(c * y))/dx||^2 (create_graph) on the samples ``rows``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), bn_cls(3)).double()
    x, c = penalty_batch()
    x = x[rows].clone().requires_grad_()
    (gx,) = torch.autograd.grad((model(x) * c[rows]).sum(), x, create_graph=True)
    gx.square().sum().backward()
    # (the BN bias does not enter d/dx: its gradient stays None, here zero)
    grads = {k: torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for k, p in model.named_parameters()}
    return {"dx": x.grad, **grads}


def penalty_on_rank(sizes):
    start = sum(sizes[: dist.get_rank()])
    return gradient_penalty(SyncBatchNorm, slice(start, start + sizes[dist.get_rank()]))


@pytest.mark.parametrize("sizes", [[3, 4], [7, 0]], ids=["3+4", "7+empty"])
def test_gradient_penalty_across_two_ranks_equals_torch_bn_on_the_whole_batch(world2, sizes):
    got = world2.run(penalty_on_rank, sizes)
    ref = gradient_penalty(nn.BatchNorm1d, slice(0, 7))
    assert_close(torch.cat([g["dx"] for g in got]), ref["dx"])
    for key in ref:
        if key != "dx":  # each rank holds its share of the parameter gradients (DDP sums them)
            assert_close(sum(g[key] for g in got), ref[key])


def test_gradient_penalty_in_one_process_equals_torch_bn():
    ours, ref = gradient_penalty(SyncBatchNorm, slice(0, 7)), gradient_penalty(
        nn.BatchNorm1d, slice(0, 7))
    for key in ref:
        assert_close(ours[key], ref[key])


# ------------------------------------------------------------------------------ ranks disagree
def layer_of(channels, dtype=torch.float32):
    layer = SyncBatchNorm(channels, dtype=dtype)
    layer._rethinkbn_name = "head.bn"
    return layer


def channels_differ(channels):
    c = channels[dist.get_rank()]
    return error_text(layer_of(c), torch.randn(4, c))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_that_disagree_on_channels_all_fail_saying_what_differs(world2, world3,
                                                                      world_size):
    world = {2: world2, 3: world3}[world_size]
    channels = [3] * (world_size - 1) + [5]
    errors = world.run(channels_differ, channels)
    for text in errors:
        assert text is not None and text.startswith("ValueError")
        assert "'head.bn'" in text
        assert f"rank {world_size - 1}: 1 set(s) of moments with 5 values, channels 5" in text
        assert "rank 0: 1 set(s) of moments with 3 values, channels 3" in text
    # The group still works afterwards: nothing was left half-done.
    assert world.run(channels_differ, [3] * world_size) == [None] * world_size


def dtype_changes_on_one_rank():
    layer = layer_of(3)
    layer(torch.randn(4, 3))  # the first step agrees
    if dist.get_rank() == 1:
        layer.double()
    dtype = torch.float64 if dist.get_rank() == 1 else torch.float32
    before = {k: v.clone() for k, v in layer.named_buffers()}
    text = error_text(layer, torch.randn(4, 3, dtype=dtype))
    unchanged = all(torch.equal(before[k].to(v.dtype), v) for k, v in layer.named_buffers())
    return text, unchanged


def test_ranks_that_disagree_on_the_dtype_in_a_later_step_all_fail(world2):
    for text, unchanged in world2.run(dtype_changes_on_one_rank):
        assert text is not None and text.startswith("ValueError")
        assert "'head.bn'" in text and "disagree" in text and "dtype code" in text
        assert unchanged


def gather_layers(counts):
    layers = [Moments.of(torch.randn(4, c)) for c in counts[dist.get_rank()]]
    return error_text(all_gather_moments, layers)


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_gather_moments_with_different_layer_lists_fails_on_every_rank(world2, world3,
                                                                           world_size):
    world = {2: world2, 3: world3}[world_size]
    counts = [[3, 2]] * (world_size - 1) + [[3]]
    for text in world.run(gather_layers, counts):
        assert text is not None and "all_gather_moments" in text
        assert f"rank {world_size - 1}: 1 set(s) of moments with 3 values" in text
        assert "rank 0: 2 set(s) of moments with 5 values" in text
    assert world.run(gather_layers, [[3, 2]] * world_size) == [None] * world_size


def reduce_same_size_different_layers():
    # Equal buffer lengths (one set of 4 values, or two of 2): caught by the buffer's header.
    shapes = [[4], [2, 2]][dist.get_rank()]
    return error_text(all_reduce_moments, [Moments.of(torch.randn(3, c)) for c in shapes])


def test_all_reduce_moments_with_equal_lengths_but_different_layers_fails_on_every_rank(world2):
    for text in world2.run(reduce_same_size_different_layers):
        assert text is not None and "all_reduce_moments" in text and "disagree" in text


# ------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input_raises_type_error_naming_the_layer(training, dtype):
    layer = layer_of(3).train(training)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match=r"'head.bn'.*floating-point.*" + str(dtype)):
        layer(torch.ones(4, 3, dtype=dtype))
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("training", [True, False])
def test_float64_input_into_a_float32_layer_raises_type_error_naming_the_layer(training):
    layer = layer_of(3).train(training)
    with pytest.raises(TypeError, match=r"'head.bn'.*torch.float32.*got torch.float64"):
        layer(torch.ones(4, 3, dtype=torch.float64))
    # torch refuses it as well, with a message that names no layer
    with pytest.raises(RuntimeError, match="mixed dtype"):
        nn.BatchNorm1d(3).train(training)(torch.ones(4, 3, dtype=torch.float64))


def test_half_input_into_a_float32_layer_is_accepted():
    y = layer_of(3)(torch.randn(4, 3).half())
    assert y.dtype == torch.float16


# ------------------------------------------------------------------------------ GPU-ready
def test_training_step_runs_on_the_meta_device_so_it_reads_no_value_on_the_host():
    # Any .item() / float() / bool() of a device tensor fails on `meta`: a step that runs there
    # makes no host-device synchronization (the old group count read did).
    layer = SyncBatchNorm(3, device="meta")
    x = torch.randn(4, 3, 5, device="meta", requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == x.shape and layer.running_mean.device.type == "meta"


class LargestFloat64(TorchDispatchMode):
    """Records the size of the largest float64 tensor any torch operation produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_statistics_of_float32_and_half_inputs_make_no_float64_copy_of_the_activation(dtype):
    x = (torch.randn(8, 3, 6, 6) * 1e-2 + 1e4).to(dtype).requires_grad_()
    layer = SyncBatchNorm(3)
    with LargestFloat64() as mode:
        layer(x).sum().backward()
    assert mode.largest <= x.size(0) * x.size(1)  # per-sample partial moments at most
    exact = x.detach().double()
    assert_close(layer.running_mean.double(), 0.9 * 0 + 0.1 * exact.mean((0, 2, 3)),
                 atol=0, rtol=1e-6)
    unbiased = exact.var((0, 2, 3), unbiased=True)
    assert_close(layer.running_var.double(), 0.9 + 0.1 * unbiased, atol=1e-9, rtol=1e-6)
