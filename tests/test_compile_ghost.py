"""GhostBatchNorm under torch.compile: the plain-torch path inductor fuses, against eager.

Eager ghost BN runs hand-written kernels (autograd functions tuned for CPU); a compiled model
takes :func:`rethinkbn.layers.ghost_kernels._composite_group_norm` instead. Both must give the
same outputs, gradients and running statistics (float32 round-off: compiled kernels sum in
another order), on every layout the eager kernels distinguish, with no graph break and no
recompilation from one step to the next.
"""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from rethinkbn import to_ghost_bn

TOL = {"rtol": 1e-4, "atol": 1e-5}

# (name, BN class, input shape, memory format): short rows (the eager transposed kernel), long
# rows (the eager contiguous kernel), channels_last, and a 2-D (N, C) input.
LAYOUTS = [
    ("1-D, rows of 12", nn.BatchNorm1d, (8, 3, 12), torch.contiguous_format),
    ("2-D, rows of 81", nn.BatchNorm2d, (8, 3, 9, 9), torch.contiguous_format),
    ("2-D channels_last", nn.BatchNorm2d, (8, 3, 5, 5), torch.channels_last),
    ("(N, C)", nn.BatchNorm1d, (8, 3), torch.contiguous_format),
]


def _inputs(shape, fmt, steps=3):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(shape, generator=g) * 2 + 1 for _ in range(steps)]
    return [x.contiguous(memory_format=fmt) if x.dim() == 4 else x for x in xs]


def _run(model, xs):
    out = []
    for x in xs:
        x = x.clone().requires_grad_()
        y = model(x)
        (y * torch.linspace(-1, 2, y.numel()).view(y.shape)).sum().backward()
        out.append((y.detach(), x.grad, *(p.grad.clone() for p in model.parameters())))
        for p in model.parameters():
            p.grad = None
    return out


@pytest.mark.parametrize(("name", "bn", "shape", "fmt"), LAYOUTS, ids=[n for n, *_ in LAYOUTS])
def test_compiled_ghost_matches_eager_without_breaks_or_recompiles(name, bn, shape, fmt):
    nbs = 2  # 4 groups of 2 (every equal-group size takes the same path)
    torch.manual_seed(0)
    layer = bn(shape[1])
    nn.init.uniform_(layer.weight, 0.5, 1.5)
    nn.init.uniform_(layer.bias, -0.5, 0.5)
    eager = to_ghost_bn(nn.Sequential(layer), nbs).train()
    compiled_model = copy.deepcopy(eager)
    xs = _inputs(shape, fmt)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(compiled_model, fullgraph=True)  # a graph break would raise
    got, want = _run(compiled, xs), _run(eager, xs)
    assert counters["stats"]["unique_graphs"] == 1  # the later steps reuse the first graph
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            torch.testing.assert_close(a, b, **TOL)
    assert got[0][0].is_contiguous(memory_format=fmt) if len(shape) == 4 else True
    for (key, a), b in zip(compiled_model.state_dict().items(),
                           eager.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=key)
