"""DomainBatchNorm under torch.compile: one graph for any per-domain counts, and torch's numbers.

Issue 21 item 3: with per-sample ids the layer read the domains' sizes on the host (validation,
then one torch BatchNorm per domain), so a compiled model broke its graph at every layer (18
breaks per model in benchmarks/results/model_compile.md). Compiled, and with ``validate=False``,
every domain is now normalized in one vectorized pass of static shapes (``masked_domain_norm``).
References: the eager layer (one torch BatchNorm per domain) and the slow obvious loop of torch
BatchNorm over each domain's samples in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.testing import assert_close

from rethinkbn.layers import DomainBatchNorm

# Per-domain counts that change every call: all present, one absent, other sizes.
STEPS = [
    [1, 0, 2, 2, 0, 1, 0, 2, 1, 1],
    [2, 0, 0, 2, 2, 0, 0, 2, 0, 2],  # domain 1 absent
    [0, 0, 1, 0, 2, 0, 1, 0, 0, 2],
]


class Net(nn.Module):
    """conv -> DomainBatchNorm -> ReLU -> DomainBatchNorm (per-domain affine)."""

    def __init__(self, **options: object) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.bn1 = DomainBatchNorm(4, 3, **options)
        self.bn2 = DomainBatchNorm(4, 3, affine="domain", **options)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.bn2(torch.relu(self.bn1(self.conv(x), ids)), ids)


def step(model, x, ids, dy):
    x = x.clone().requires_grad_()
    y = model(x, ids)
    y.backward(dy)
    return y.detach(), x.grad


@pytest.mark.parametrize("validate", [True, False])
def test_a_compiled_model_has_one_graph_for_counts_that_change_and_matches_eager(validate):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Net(validate=validate)
    with torch.no_grad():
        for p in eager.parameters():
            p.uniform_(0.5, 1.5)
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)  # a break raises
    g = torch.Generator().manual_seed(1)
    for ids in map(torch.tensor, STEPS):
        x, dy = torch.randn(10, 2, 5, generator=g) * 2 + 1, torch.randn(10, 4, 5, generator=g)
        (y, dx), (y_ref, dx_ref) = step(compiled, x, ids, dy), step(eager, x, ids, dy)
        assert_close(y, y_ref), assert_close(dx, dx_ref)
    assert counter.frame_count == 1  # the second and third counts did not recompile
    grads = {n: p.grad for n, p in compiled_model.named_parameters()}
    assert_close(grads, {n: p.grad for n, p in eager.named_parameters()})
    assert_close(dict(compiled_model.named_buffers()), dict(eager.named_buffers()))
    assert eager.bn2.num_batches_tracked.tolist() == [3, 2, 3]


TABLE_5 = [  # (train_stats, population_stats, affine): the six rows of the paper's Table 5
    ("shared", "shared", "shared"), ("shared", "domain", "shared"),
    ("domain", "shared", "shared"), ("domain", "domain", "shared"),
    ("domain", "shared", "domain"), ("domain", "domain", "domain"),
]


@pytest.mark.parametrize("flags", TABLE_5, ids=["-".join(f) for f in TABLE_5])
def test_every_table_5_row_traces_to_one_graph_and_matches_eager(flags):
    torch._dynamo.reset()
    eager = DomainBatchNorm(4, 3, *flags)
    compiled_layer = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_layer, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(2)
    for ids in map(torch.tensor, STEPS):
        x, dy = torch.randn(10, 4, 3, generator=g), torch.randn(10, 4, 3, generator=g)
        (y, dx), (y_ref, dx_ref) = step(compiled, x, ids, dy), step(eager, x, ids, dy)
        assert_close(y, y_ref), assert_close(dx, dx_ref)
    assert counter.frame_count == 1
    assert_close(dict(compiled_layer.named_buffers()), dict(eager.named_buffers()))
    assert_close({n: p.grad for n, p in compiled_layer.named_parameters()},
                 {n: p.grad for n, p in eager.named_parameters()})


def float64_loop(layer, x, ids):
    """Each domain's samples through a float64 torch BatchNorm holding that domain's
    parameters and buffers: y, and the updated (running_mean, running_var) per domain."""
    y, stats = torch.zeros_like(x, dtype=torch.float64), {}
    for d in range(layer.num_domains):
        rows = (ids == d).nonzero().flatten()
        if not rows.numel():
            continue
        bn = nn.BatchNorm1d(x.size(1), momentum=layer.momentum, dtype=torch.float64)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                mine = getattr(layer, name)
                getattr(bn, name).copy_(mine[d] if mine.dim() == 2 else mine)
        y[rows] = bn(x[rows].double()).detach()
        stats[d] = bn.running_mean, bn.running_var
    return y, stats


@settings(max_examples=15, deadline=None)
@given(
    ids=st.lists(st.integers(0, 2), min_size=4, max_size=12),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    affine=st.sampled_from(["shared", "domain"]),
)
def test_the_vectorized_pass_matches_a_float64_loop_of_torch_batchnorm(ids, dtype, affine):
    ids = torch.tensor(ids)
    if any(0 < int((ids == d).sum()) < 2 for d in range(3)):
        ids = torch.cat([ids, ids])  # every domain present has 2 samples
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    layer = DomainBatchNorm(3, 3, affine=affine, dtype=param_dtype, validate=False)
    g = torch.Generator().manual_seed(len(ids))
    with torch.no_grad():
        for t in (layer.weight, layer.bias, layer.running_mean, layer.running_var):
            t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5)
    x = (torch.randn(ids.numel(), 3, 4, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    y_ref, stats = float64_loop(layer, x, ids)
    y = layer(x, domain=ids)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype.itemsize == 2 else {}
    assert y.dtype == dtype
    assert_close(y, y_ref.to(dtype), **tol)
    for d in range(3):
        if d in stats:
            assert_close(layer.running_mean[d].double(), stats[d][0], rtol=1e-5, atol=1e-6)
            assert_close(layer.running_var[d].double(), stats[d][1], rtol=1e-5, atol=1e-6)
        else:  # absent: untouched
            assert layer.num_batches_tracked[d] == 0


@pytest.mark.parametrize("affine", ["shared", "domain", False])
def test_the_vectorized_pass_has_exact_first_and_second_derivatives(affine):
    layer = DomainBatchNorm(2, 3, affine=affine, dtype=torch.float64, track_running_stats=False,
                            validate=False)
    ids = torch.tensor(STEPS[1])  # domain 1 absent
    x = torch.randn(10, 2, 3, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (x,),
                                          {"domain": ids})

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


def test_a_nan_in_one_domain_leaves_the_other_domains_statistics_torchs():
    # The per-domain sums are masked: a NaN sample must not reach another domain's sums (as a
    # one-hot matmul would, 0 * NaN).
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    ids = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    x[1, 0, 2] = float("nan")  # domain 1, channel 0
    fast, checked = DomainBatchNorm(3, 2, validate=False), DomainBatchNorm(3, 2)
    fast, checked = fast.double(), checked.double()
    y, y_ref = fast(x, domain=ids), checked(x, domain=ids)
    assert_close(y, y_ref, equal_nan=True)
    assert y[ids == 0].isfinite().all()
    assert_close(dict(fast.named_buffers()), dict(checked.named_buffers()))
    assert fast.nonfinite_count.tolist() == [[0, 0, 0], [1, 0, 0]]


@pytest.mark.parametrize(
    ("x", "ids", "message"),
    [
        (torch.randn(4, 3, 2), [0, 1, 2, 0], r"domain ids must be in \[0, 2\)"),
        (torch.randn(4, 3), [0, 0, 0, 1], "more than 1 value per channel for every domain"),
    ],
)
def test_compiled_validation_raises_naming_the_layer(x, ids, message):
    torch._dynamo.reset()
    layer = DomainBatchNorm(3, 2)
    layer._rethinkbn_name = "head.bn"
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    compiled(x, torch.tensor([0, 1, 1, 0]))  # valid ids: compiled once
    with pytest.raises(RuntimeError, match=rf"'head.bn'.*{message}"):
        compiled(x, torch.tensor(ids))


def test_a_0d_domain_tensor_compiles_without_reading_it():
    torch._dynamo.reset()
    eager, compiled_layer = DomainBatchNorm(3, 3), DomainBatchNorm(3, 3)
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 3, 2)
    assert_close(compiled(x, torch.tensor(2)), eager(x, domain=2))
    assert_close(dict(compiled_layer.named_buffers()), dict(eager.named_buffers()))
