"""What a training step keeps for the backward (issue 21): ghost BatchNorm and FrozenBatchNorm
keep no more activation memory than torch's BatchNorm in the same place.

Measured as the bytes of the distinct storages autograd saves during forward (the tensors that
live until the backward), through ``torch.autograd.graph.saved_tensors_hooks``; the reference is
torch's BatchNorm on the same input (training mode for ghost, eval mode for frozen) and, for
FrozenBatchNorm with fixed affine parameters, a multiply-add by constants (detectron2's
FrozenBatchNorm2d), which keeps no activation at all.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rethinkbn.layers import FrozenBatchNorm, GhostBatchNorm


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return sum(storages.values())


def activation(shape, dtype=torch.float32, channels_last=False):
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


CASES = [((64, 8, 10), torch.float32, False), ((16, 4, 16, 16), torch.float32, False),
         ((16, 4, 16, 16), torch.float32, True), ((32, 6), torch.float64, False),
         ((16, 4, 9, 9), torch.float16, False)]


@pytest.mark.parametrize("shape,dtype,channels_last", CASES)
@pytest.mark.parametrize("nbs", [None, 8, 2])
def test_ghost_keeps_what_torch_batchnorm_keeps(shape, dtype, channels_last, nbs):
    x = activation(shape, dtype, channels_last)
    params = torch.float32 if dtype == torch.float16 else dtype
    ghost = GhostBatchNorm(shape[1], norm_batch_size=nbs).to(params)
    torch_bn = nn.SyncBatchNorm(shape[1]).to(params)  # every rank, no process group: plain BN
    groups = 1 if nbs is None else shape[0] // nbs
    # the per-group statistics (mean and 1/std, float32 or wider) are all a step may add
    stats = 2 * groups * shape[1] * 8
    assert saved_bytes(ghost, x) <= saved_bytes(torch_bn, x) + stats


@pytest.mark.parametrize("shape,dtype,channels_last", CASES[:4])
def test_frozen_keeps_what_torch_batchnorm_keeps_in_eval(shape, dtype, channels_last):
    x = activation(shape, dtype, channels_last)
    frozen = FrozenBatchNorm(shape[1]).to(dtype)
    torch_bn = nn.SyncBatchNorm(shape[1]).to(dtype).eval()
    assert saved_bytes(frozen, x) <= saved_bytes(torch_bn, x)


@pytest.mark.parametrize("shape,dtype,channels_last", CASES[:4])
def test_frozen_with_fixed_affine_keeps_no_activation(shape, dtype, channels_last):
    x = activation(shape, dtype, channels_last)
    frozen = FrozenBatchNorm(shape[1], affine_trainable=False).to(dtype)
    assert saved_bytes(frozen, x) < x.numel() * x.element_size()
