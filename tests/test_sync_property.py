"""Property tests of SyncBatchNorm with 1, 2 and 3 ranks, and SyncBatchNorm under torch.compile.

For drawn per-rank batch sizes (empty local batches included), channels, affine on/off and
momentum (0.1 or None, the cumulative average), two training steps of SyncBatchNorm in float64
must match torch's BatchNorm1d on the concatenated batch: each rank's slice of the output, the
input gradient, the weight/bias gradients (each rank holds its share; DDP sums them), a second
derivative (the gradient of an input-gradient penalty, ``create_graph=True``) and the running
buffers after the steps. One rank runs in this process without a process group; 2 and 3 ranks
run in the real gloo worlds of tests/test_sync_bn.py. The drawn example is sent to the ranks.

``torch.compile`` (the ``aot_eager`` backend keeps it fast on CPU) of
``Linear -> SyncBatchNorm`` trains like eager with 1 rank and with 2 ranks: without a process
group in one graph (``fullgraph=True``); across ranks the collectives and the layer's host-side
checks become graph breaks. Outputs, gradients and buffers agree.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

import test_sync_bn
from rethinkbn.distributed import SyncBatchNorm

# The gloo worlds of 2 and 3 ranks (module-scoped fixtures, one world per module).
world2, world3 = test_sync_bn.world2, test_sync_bn.world3

SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)
TOL = {"rtol": 1e-10, "atol": 1e-10}
D = torch.float64
STEPS = 2


def specs(world_size: int) -> st.SearchStrategy[dict]:
    sizes = st.lists(st.integers(0, 4), min_size=world_size, max_size=world_size).filter(
        lambda s: sum(s) >= 2)
    return st.fixed_dictionaries({
        "sizes": sizes, "channels": st.integers(1, 3), "affine": st.booleans(),
        "momentum": st.sampled_from([0.1, None]), "seed": st.integers(0, 2**16),
    })


def make_layer(bn_cls, spec):
    layer = bn_cls(spec["channels"], momentum=spec["momentum"], affine=spec["affine"], dtype=D)
    if spec["affine"]:
        g = torch.Generator().manual_seed(spec["seed"] + 1)
        with torch.no_grad():
            layer.weight.copy_(torch.rand(spec["channels"], generator=g, dtype=D) + 0.5)
            layer.bias.copy_(torch.randn(spec["channels"], generator=g, dtype=D))
    return layer


def step_data(spec, step):
    """The concatenated batch of one step and the loss's weights (the same on every rank)."""
    g = torch.Generator().manual_seed(spec["seed"] * 16 + step)
    n, c = sum(spec["sizes"]), spec["channels"]
    x = 2 * torch.randn(n, c, generator=g, dtype=D) + torch.randn(c, generator=g, dtype=D)
    return x, torch.randn(n, c, generator=g, dtype=D)


def train(bn_cls, spec, rows):
    """STEPS steps on the samples ``rows`` of each batch: output, first derivatives of
    sum(y * r), second derivatives of |d/dx|^2 per step, and the buffers after the steps."""
    layer = make_layer(bn_cls, spec)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    record = []
    for step in range(STEPS):
        x, r = step_data(spec, step)
        x = x[rows].clone().requires_grad_()
        y = layer(x)
        first = torch.autograd.grad((y * r[rows]).sum(), [x, *params], create_graph=True)
        second = torch.autograd.grad(first[0].square().sum(), [x, *params], allow_unused=True)
        second = [torch.zeros_like(p) if s is None else s
                  for p, s in zip([x, *params], second, strict=True)]
        record.append({"y": y.detach(), "first": [f.detach() for f in first], "second": second})
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    return record, buffers


def rank_rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def train_on_rank(spec):
    return train(SyncBatchNorm, spec, rank_rows(spec["sizes"], dist.get_rank()))


def check_against_torch(spec, results):
    ref_record, ref_buffers = train(nn.BatchNorm1d, spec, slice(None))
    for step, ref in enumerate(ref_record):
        steps = [record[step] for record, _ in results]
        assert_close(torch.cat([s["y"] for s in steps]), ref["y"], **TOL)
        for order in ("first", "second"):
            # input gradients: concatenated slices; parameter gradients: the ranks' shares summed
            assert_close(torch.cat([s[order][0] for s in steps]), ref[order][0], **TOL)
            for i in range(1, len(ref[order])):
                assert_close(sum(s[order][i] for s in steps), ref[order][i], **TOL)
    for _, buffers in results:
        assert not buffers.pop("nonfinite_count").any()  # ours: no non-finite batch was skipped
        assert not buffers.pop("skipped_batches").any()  # ours: the per-channel count of those
        assert buffers.keys() == ref_buffers.keys()
        for key, value in ref_buffers.items():
            assert_close(buffers[key], value, **TOL)


@SETTINGS
@given(spec=specs(1))
def test_one_rank_without_process_group_matches_torch_bn(spec):
    check_against_torch(spec, [train(SyncBatchNorm, spec, slice(None))])


@SETTINGS
@given(spec=specs(2))
def test_two_ranks_match_torch_bn_on_the_concatenated_batch(world2, spec):
    check_against_torch(spec, world2.run(train_on_rank, spec))


@SETTINGS
@given(spec=specs(3))
def test_three_ranks_match_torch_bn_on_the_concatenated_batch(world3, spec):
    check_against_torch(spec, world3.run(train_on_rank, spec))


# ------------------------------------------------------------------------------ torch.compile
def compile_vs_eager(sizes, fullgraph=False):
    """Linear -> SyncBatchNorm trained 2 steps eagerly and through torch.compile (this rank's
    share of each batch when a process group exists): both records."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(3, 4), SyncBatchNorm(4))
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager", fullgraph=fullgraph)
    records = []
    for model in (eager, compiled):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        record = []
        for _ in range(2):
            x = torch.randn(sum(sizes), 3, generator=g) * 2 + 1
            optimizer.zero_grad()
            y = model(x[rank_rows(sizes, rank)])
            y.square().sum().backward()
            grads = {n.removeprefix("_orig_mod."): p.grad.clone()
                     for n, p in model.named_parameters()}
            optimizer.step()
            record.append((y.detach(), grads))
        buffers = {n.removeprefix("_orig_mod."): b.clone() for n, b in model.named_buffers()}
        records.append((record, buffers))
    torch._dynamo.reset()
    return records


def check_compiled_equals_eager(records):
    (eager, eager_buffers), (compiled, compiled_buffers) = records
    for (y, grads), (y_c, grads_c) in zip(eager, compiled, strict=True):
        assert_close(y_c, y, rtol=1e-5, atol=1e-6)
        assert grads_c.keys() == grads.keys()
        for key, value in grads.items():
            assert_close(grads_c[key], value, rtol=1e-5, atol=1e-6)
    assert compiled_buffers.keys() == eager_buffers.keys()
    for key, value in eager_buffers.items():
        assert_close(compiled_buffers[key], value, rtol=1e-5, atol=1e-6)


def test_compiled_sync_bn_without_process_group_equals_eager_in_one_graph():
    check_compiled_equals_eager(compile_vs_eager([6], fullgraph=True))


@pytest.mark.parametrize("sizes", [[3, 4], [6, 0]], ids=["3+4", "6+empty"])
def test_compiled_sync_bn_across_two_ranks_equals_eager(world2, sizes):
    for records in world2.run(compile_vs_eager, sizes):
        check_compiled_equals_eager(records)
