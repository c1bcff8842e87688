"""Both kernels of contiguous ghost groups (layers/ghost_kernels.py) against the obvious
reference, a loop of torch's BatchNorm over the groups in float64: the transposed kernel (a
contiguous input with at most TRANSPOSE_ROWS values per sample and channel and at most
TRANSPOSE_BYTES) and the row kernel (longer rows, larger inputs, channels_last). First
derivatives by comparison and gradcheck, second derivatives by gradgradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rethinkbn.layers import ghost_kernels as K

# (shape, channels_last): which kernel runs is checked in the test
CASES = {
    "transposed, rows of 3": ((8, 2, 3), False),
    "transposed, (N, C)": ((8, 3), False),
    "transposed, rows of 64": ((4, 2, 8, 8), False),
    "row kernel, rows of 81": ((4, 2, 9, 9), False),
    "row kernel, channels_last": ((4, 2, 3, 3), True),
}


def make(shape, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 5 + 2 * torch.randn(shape, dtype=torch.float64, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], dtype=torch.float64, generator=g)
    b = torch.randn(shape[1], dtype=torch.float64, generator=g)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


def loop_reference(x, w, b, groups, eps=1e-5):
    return torch.cat([F.batch_norm(chunk, None, None, w, b, True, 0.0, eps)
                      for chunk in x.chunk(groups)])


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_a_loop_of_torch_bn_with_gradients(case):
    shape, channels_last = CASES[case]
    x, w, b = make(shape, channels_last)
    assert K._transposes(x) == case.startswith("transposed")
    check_against_the_loop(x, w, b)


def check_against_the_loop(x, w, b):
    channels_last = not x.is_contiguous()
    y, mean, var = K.contiguous_group_norm(x, w, b, 2, 1e-5)
    expected = loop_reference(x, w, b, 2)
    torch.testing.assert_close(y, expected)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)
    chunks = x.detach().chunk(2)
    dims = [0, *range(2, x.dim())]
    torch.testing.assert_close(mean, torch.stack([c.mean(dims) for c in chunks]))
    torch.testing.assert_close(var, torch.stack([c.var(dims, correction=0) for c in chunks]))
    grad = torch.randn_like(y)
    mine = torch.autograd.grad(y, (x, w, b), grad)
    ref = torch.autograd.grad(expected, (x, w, b), grad)
    for a, e in zip(mine, ref, strict=True):
        torch.testing.assert_close(a, e)


def test_a_large_input_with_short_rows_runs_the_row_kernel():
    # Past TRANSPOSE_BYTES the copies into rows cost more than they save (issue 21: the layer
    # benchmark's (128, 256, 8, 8) and (1024, 64, 40) went from 0.7-1.0x torch BN to 1.5-1.8x).
    shape = (4 * K.TRANSPOSE_BYTES // (8 * 40 * 8), 8, 40)
    x, w, b = make(shape, False)
    assert x.numel() * x.element_size() > K.TRANSPOSE_BYTES
    assert not K._transposes(x) and K._transposes(x[: shape[0] // 8])
    check_against_the_loop(x, w, b)


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_first_and_second_derivatives(case):
    shape, channels_last = CASES[case]
    x, w, b = make(shape, channels_last, seed=1)
    f = lambda x, w, b: K.contiguous_group_norm(x, w, b, 2, 1e-5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_without_affine_parameters():
    x, _, _ = make((8, 2, 3), False)
    y, _, _ = K.contiguous_group_norm(x, None, None, 4, 1e-5)
    torch.testing.assert_close(y, loop_reference(x, None, None, 4))
    (gx,) = torch.autograd.grad(y.sin().sum(), x)
    (ref,) = torch.autograd.grad(loop_reference(x, None, None, 4).sin().sum(), x)
    torch.testing.assert_close(gx, ref)
