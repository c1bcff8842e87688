"""Memory traffic of the layers: which full-size (activation-sized) tensors a step creates.

Every op a step dispatches is recorded with the tensors it returns; a tensor with as many
elements as the input is an activation-sized pass over memory. The promises (issue 13, 3):
channels_last inputs are never copied to the contiguous format on the contiguous-group path,
a float16 input keeps no float32 copy for the backward, no op makes an activation-sized float64
tensor from float32 input, FrozenBatchNorm's eval is one pass, and a 0-d domain tensor with
``validate=False`` is not read on the host.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rethinkbn.layers import DomainBatchNorm, FrozenBatchNorm, GhostBatchNorm

SHAPE = (8, 3, 4, 5)
NUMEL = 8 * 3 * 4 * 5


class FullSizeOps(TorchDispatchMode):
    """Records ``(op name, dtype, layout)`` of every activation-sized op output; the layout is
    "channels_last" or "contiguous" for a tensor of the input's shape, else "internal"."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, torch.dtype, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() == NUMEL:
                layout = "internal" if tuple(t.shape) != SHAPE else (
                    "channels_last" if t.is_contiguous(memory_format=torch.channels_last)
                    else "contiguous")
                self.ops.append((func.overloadpacket.__name__, t.dtype, layout))
        return out


def train_step(layer, x, **kwargs) -> FullSizeOps:
    x = x.detach().requires_grad_()
    with FullSizeOps() as rec:
        y = layer(x, **kwargs)
        y.backward(torch.ones_like(y))
    rec.y, rec.grad = y, x.grad  # type: ignore[attr-defined]
    return rec


@pytest.mark.parametrize("nbs", [2, None])
def test_channels_last_stays_channels_last_without_a_copy(nbs):
    x = torch.randn(SHAPE).to(memory_format=torch.channels_last)
    rec = train_step(GhostBatchNorm(3, nbs), x)
    assert rec.y.is_contiguous(memory_format=torch.channels_last)
    assert rec.grad.is_contiguous(memory_format=torch.channels_last)
    copies = [op for op in rec.ops if op[0] in ("clone", "contiguous", "_to_copy", "copy_")]
    assert copies == []
    assert "contiguous" not in [layout for _, _, layout in rec.ops]


def test_channels_last_contiguous_groups_match_the_contiguous_input():
    x = torch.randn(SHAPE)
    a, b = GhostBatchNorm(3, 2), GhostBatchNorm(3, 2)
    ya = train_step(a, x)
    yb = train_step(b, x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(yb.y, ya.y)
    torch.testing.assert_close(yb.grad, ya.grad)
    torch.testing.assert_close(b.running_var, a.running_var)


@pytest.mark.parametrize("nbs", [2, None])
def test_a_half_input_keeps_no_float32_copy_for_the_backward(nbs):
    layer = GhostBatchNorm(3, nbs)
    x = torch.randn(SHAPE).half().requires_grad_()
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    full = [t.dtype for t in saved if t.numel() == NUMEL]
    assert full and all(d == torch.float16 for d in full)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float16


LAYERS = {
    "ghost whole": (lambda: GhostBatchNorm(3), {}),
    "ghost contiguous": (lambda: GhostBatchNorm(3, 2), {}),
    "ghost strided": (lambda: GhostBatchNorm(3, 2, grouping="strided"), {}),
    "ghost unequal": (lambda: GhostBatchNorm(3, 3), {}),
    "domain int": (lambda: DomainBatchNorm(3, 3), {"domain": 1}),
    "domain ids": (lambda: DomainBatchNorm(3, 3), {"domain": torch.tensor([0, 1, 0, 2] * 2)}),
    "frozen": (lambda: FrozenBatchNorm(3), {}),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_no_activation_sized_float64_tensor_from_float32_input(name):
    make, kwargs = LAYERS[name]
    rec = train_step(make(), torch.randn(SHAPE), **kwargs)
    assert [op for op in rec.ops if op[1] == torch.float64] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_frozen_eval_is_one_pass(dtype):
    layer = FrozenBatchNorm(3).eval()
    layer.running_mean.uniform_(-1, 1)
    layer.running_var.uniform_(0.5, 2)
    x = torch.randn(SHAPE).to(dtype)
    with torch.no_grad(), FullSizeOps() as rec:
        y = layer(x)
    assert len(rec.ops) == 1 and y.dtype == dtype
    expected = torch.nn.functional.batch_norm(
        x.float(), layer.running_mean, layer.running_var, layer.weight, layer.bias, False)
    torch.testing.assert_close(y.float(), expected, atol=2e-3, rtol=2e-3)


def test_a_0d_domain_tensor_without_validation_is_not_read_on_the_host():
    from test_nan_policy import ForbidHostSync

    x = torch.randn(SHAPE)
    fast, checked = DomainBatchNorm(3, 3, validate=False), DomainBatchNorm(3, 3)
    domain = torch.tensor(2)
    with ForbidHostSync():
        y = fast(x, domain=domain)
    torch.testing.assert_close(y, checked(x, domain=2))
    torch.testing.assert_close(fast.running_mean, checked.running_mean)
    torch.testing.assert_close(fast.running_var, checked.running_var)
