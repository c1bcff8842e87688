"""Property tests that hunt for siblings of the layer bugs of issue 9.

For every layer of the family and every normalization path (whole batch, equal contiguous, equal
strided, unequal groups, per-device chunks, domains by int and by per-sample ids, frozen), in
training and in eval: the output, the first derivatives, the second derivatives (an input-gradient
penalty) and the running buffers equal a loop of torch's BatchNorm in float64, one call per group.
Batches too small for a variance (empty batches or groups of one value) must raise a ValueError
naming the layer, and leave it unchanged; where torch accepts an empty batch (eval, frozen) the
layer does too. SyncBatchNorm's ranks are covered in tests/test_sync_bn.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bn_reference import contiguous_groups, domain_groups, loop_batch_norm, strided_groups
from rethinkbn.distributed.virtual import PerDeviceBatchNorm
from rethinkbn.layers import DomainBatchNorm, FrozenBatchNorm, GhostBatchNorm

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
TOL = {"rtol": 1e-6, "atol": 1e-7}
EPS = 1e-5
D = torch.float64


def data(seed, n, c, spatial, offset):
    g = torch.Generator().manual_seed(seed)
    x = offset + torch.randn(n, c, *spatial, generator=g, dtype=D)
    r = torch.randn(n, c, *spatial, generator=g, dtype=D)  # the loss's weights
    return x, r


def derivatives(f, x, w, b, r):
    """y = f(x, w, b); first derivatives of sum(y * r); second ones of |d/dx|^2 (zeros where a
    derivative does not depend on the input)."""
    x = x.clone().requires_grad_()
    params = [t for t in (x, w, b) if t is not None]
    y = f(x, w, b)
    first = torch.autograd.grad((y * r).sum(), params, create_graph=True, allow_unused=True)
    first = [torch.zeros_like(p) if g is None else g for p, g in zip(params, first, strict=True)]
    second = [torch.zeros_like(p) for p in params]
    if first[0].requires_grad:
        found = torch.autograd.grad(first[0].square().sum(), params, allow_unused=True)
        second = [z if g is None else g for z, g in zip(second, found, strict=True)]
    return y.detach(), [t.detach() for t in first], second


def assert_same(mine, expected):
    y, first, second = mine
    y_ref, first_ref, second_ref = expected
    torch.testing.assert_close(y, y_ref, **TOL)
    for a, e in zip(first, first_ref, strict=True):
        torch.testing.assert_close(a, e, **TOL)
    for a, e in zip(second, second_ref, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def params_of(layer, seed):
    g = torch.Generator().manual_seed(seed + 1)
    if layer.weight is None:
        return None, None
    w = (torch.rand(layer.weight.shape, generator=g, dtype=D) + 0.5).requires_grad_()
    b = torch.randn(layer.bias.shape, generator=g, dtype=D).requires_grad_()
    return w, b


def randomize_buffers(layer, seed):
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=g, dtype=D))
        layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=g, dtype=D) + 0.5)


def call(layer, kwargs):
    return lambda x, w, b: torch.func.functional_call(
        layer, {"weight": w, "bias": b} if w is not None else {}, (x,), kwargs)


def blend(old, new, momentum, t):
    factor = 1.0 / t if momentum is None else momentum
    return (1 - factor) * old + factor * new


def assert_refused(layer, x, kwargs):
    layer._rethinkbn_name = "net.bn"
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="'net.bn'.*more than 1 value per channel"):
        layer(x, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


shapes = st.fixed_dictionaries({
    "seed": st.integers(0, 2**16),
    "n": st.integers(0, 9),
    "c": st.integers(1, 3),
    "spatial": st.sampled_from([(), (1,), (3,), (2, 2)]),
    "offset": st.sampled_from([0.0, 50.0]),
    "momentum": st.sampled_from([0.3, None]),
    "affine": st.booleans(),
    "train": st.booleans(),
})


# ------------------------------------------------------------------------------ ghost groups
@SETTINGS
@given(shapes, st.sampled_from([None, 1, 2, 3, 4, 20]), st.sampled_from(["contiguous", "strided"]))
def test_ghost_equals_a_loop_of_torch_bn(s, nbs, grouping):
    layer = GhostBatchNorm(s["c"], nbs, momentum=s["momentum"], affine=s["affine"],
                           grouping=grouping, dtype=D).train(s["train"])
    check_ghost(layer, s, nbs, grouping)


@SETTINGS
@given(shapes, st.integers(1, 3))
def test_per_device_equals_a_loop_of_torch_bn_over_the_devices(s, devices):
    n = s["n"] - s["n"] % devices
    s = {**s, "n": n}
    layer = PerDeviceBatchNorm(s["c"], num_devices=devices, momentum=s["momentum"],
                               affine=s["affine"], dtype=D).train(s["train"])
    check_ghost(layer, s, max(n // devices, 1) if n else None, "contiguous")


def check_ghost(layer, s, nbs, grouping):
    randomize_buffers(layer, s["seed"])
    x, r = data(s["seed"], s["n"], s["c"], s["spatial"], s["offset"])
    w, b = params_of(layer, s["seed"])
    old = {k: v.clone() for k, v in layer.named_buffers()}
    values = x[0, 0].numel() if s["n"] else 0
    if not s["train"]:  # eval: the running statistics, for any batch (empty included)
        expected = derivatives(lambda x, w, b: F.batch_norm(
            x, old["running_mean"], old["running_var"], w, b, False, 0.0, EPS), x, w, b, r)
        assert_same(derivatives(call(layer, {}), x, w, b, r), expected)
        assert all(torch.equal(old[k], v) for k, v in layer.named_buffers())
        return
    groups = (contiguous_groups if grouping == "contiguous" else strided_groups)(s["n"], nbs)
    if s["n"] == 0 or min(len(g) for g in groups) * values < 2:
        assert_refused(layer, x, {})
        return
    expected = derivatives(lambda x, w, b: loop_batch_norm(x, groups, w, b, EPS)[0], x, w, b, r)
    assert_same(derivatives(call(layer, {}), x, w, b, r), expected)
    stats = loop_batch_norm(x, groups, None, None, EPS)[1]
    mean = sum(n * m for n, m, _ in stats) / s["n"]
    var = sum(n * v for n, _, v in stats) / s["n"]
    torch.testing.assert_close(layer.running_mean,
                               blend(old["running_mean"], mean, s["momentum"], 1), **TOL)
    torch.testing.assert_close(layer.running_var,
                               blend(old["running_var"], var, s["momentum"], 1), **TOL)
    assert layer.num_batches_tracked == 1


# ------------------------------------------------------------------------------ frozen
@SETTINGS
@given(shapes)
def test_frozen_equals_torch_bn_in_eval_in_both_modes(s):
    layer = FrozenBatchNorm(s["c"], momentum=s["momentum"], affine=s["affine"],
                            dtype=D).train(s["train"])
    randomize_buffers(layer, s["seed"])
    x, r = data(s["seed"], s["n"], s["c"], s["spatial"], s["offset"])
    w, b = params_of(layer, s["seed"])
    old = {k: v.clone() for k, v in layer.named_buffers()}
    expected = derivatives(lambda x, w, b: F.batch_norm(
        x, old["running_mean"], old["running_var"], w, b, False, 0.0, EPS), x, w, b, r)
    assert_same(derivatives(call(layer, {}), x, w, b, r), expected)
    assert all(torch.equal(old[k], v) for k, v in layer.named_buffers())


# ------------------------------------------------------------------------------ domains
@SETTINGS
@given(
    shapes,
    st.integers(1, 3),
    st.sampled_from(["domain", "shared"]),
    st.sampled_from(["domain", "shared"]),
    st.sampled_from(["shared", "domain", False]),
    st.booleans(),
)
def test_domain_equals_a_loop_of_torch_bn_per_domain(s, num_domains, train_stats, pop_stats,
                                                     affine, by_int):
    layer = DomainBatchNorm(s["c"], num_domains, train_stats, pop_stats, affine,
                            momentum=s["momentum"], dtype=D).train(s["train"])
    randomize_buffers(layer, s["seed"])
    x, r = data(s["seed"], s["n"], s["c"], s["spatial"], s["offset"])
    g = torch.Generator().manual_seed(s["seed"] + 3)
    ids = torch.randint(0, num_domains, (s["n"],), generator=g)
    domain = int(ids[0]) if by_int and s["n"] else num_domains - 1 if by_int else ids
    if by_int:
        ids = torch.full((s["n"],), domain, dtype=torch.long)
    w, b = params_of(layer, s["seed"])
    old = {k: v.clone() for k, v in layer.named_buffers()}

    def affine_of(d):
        if w is None or affine == "shared":
            return w, b
        return w[d], b[d]

    groups = domain_groups(ids, num_domains)
    if not s["train"]:
        def reference(x, w_, b_):
            out = x * 0
            for d, rows in enumerate(groups):
                if rows:
                    rm = old["running_mean"][d] if pop_stats == "domain" else old["running_mean"]
                    rv = old["running_var"][d] if pop_stats == "domain" else old["running_var"]
                    out = out.index_put((torch.tensor(rows),), F.batch_norm(
                        x[rows], rm, rv, *affine_of(d), False, 0.0, EPS))
            return out
        assert_same(derivatives(call(layer, {"domain": domain}), x, w, b, r),
                    derivatives(reference, x, w, b, r))
        return
    values = x[0, 0].numel() if s["n"] else 0
    separate = not by_int and (train_stats == "domain" or pop_stats == "domain")
    smallest = min(len(rows) for rows in groups if rows) if s["n"] else 0
    if s["n"] * values < 2 or (separate and smallest * values < 2):
        assert_refused(layer, x, {"domain": domain})
        return

    def reference(x, w_, b_):
        if train_stats == "domain":
            out = x * 0
            for d, rows in enumerate(groups):
                if rows:
                    out = out.index_put((torch.tensor(rows),), loop_batch_norm(
                        x[rows], [list(range(len(rows)))], *affine_of(d), EPS)[0])
            return out
        y = loop_batch_norm(x, [list(range(s["n"]))], None, None, EPS)[0]
        if w is None:
            return y
        wd, bd = (w[ids], b[ids]) if affine == "domain" else (w[None], b[None])
        shape = (-1, s["c"]) + (1,) * len(s["spatial"])
        return y * wd.reshape(shape) + bd.reshape(shape)

    assert_same(derivatives(call(layer, {"domain": domain}), x, w, b, r),
                derivatives(reference, x, w, b, r))
    whole = loop_batch_norm(x, [list(range(s["n"]))], None, None, EPS)[1][0]
    if pop_stats == "shared":
        torch.testing.assert_close(layer.running_mean,
                                   blend(old["running_mean"], whole[1], s["momentum"], 1), **TOL)
        torch.testing.assert_close(layer.running_var,
                                   blend(old["running_var"], whole[2], s["momentum"], 1), **TOL)
        return
    for d, rows in enumerate(groups):
        if not rows:
            for key in ("running_mean", "running_var"):
                assert torch.equal(getattr(layer, key)[d], old[key][d])
            continue
        _, mean, var = loop_batch_norm(x[rows], [list(range(len(rows)))], None, None, EPS)[1][0]
        torch.testing.assert_close(layer.running_mean[d],
                                   blend(old["running_mean"][d], mean, s["momentum"], 1), **TOL)
        torch.testing.assert_close(layer.running_var[d],
                                   blend(old["running_var"][d], var, s["momentum"], 1), **TOL)
    assert layer.num_batches_tracked.tolist() == [int(bool(rows)) for rows in groups]
