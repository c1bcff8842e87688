"""Torch's BatchNorm kernel on groups of samples: the samples of each domain, sorted together.

:class:`~rethinkbn.layers.DomainBatchNorm` normalizes each domain of a batch with its own
statistics. Rather than per-sample arithmetic in autograd, the samples are sorted by domain once
(:func:`group_by_domain`, no copy when they already are) and torch's kernel runs on each domain's
consecutive samples, writing into one output and one input gradient
(:class:`SegmentBatchNorm`): torch's math and cost per domain, plus the sort.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SegmentBatchNorm", "group_by_domain"]


class _PermuteRows(torch.autograd.Function):
    """``x.index_select(0, perm)`` for a permutation ``perm`` of the rows (``inverse`` its
    inverse), whose adjoint is the inverse permutation: one pass over the gradient, where
    autograd's ``index_select`` zero-fills a tensor and adds into it. Differentiable again
    (double backward)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, perm: Tensor, inverse: Tensor
    ) -> Tensor:
        ctx.perm, ctx.inverse = perm, inverse
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return _PermuteRows.apply(grad, ctx.inverse, ctx.perm), None, None


def _rows(t: Tensor | None, per_domain: bool, domains: list[int]) -> list[Tensor | None]:
    """Each segment's parameter: its domain's row of a per-domain ``t``, else ``t``."""
    if t is None or not per_domain:
        return [t] * len(domains)
    rows = t.unbind()
    return [rows[d] for d in domains]


def _segment_batch_norm_reference(
    xs: Tensor, weight: Tensor | None, bias: Tensor | None, sizes: list[int],
    domains: list[int], per_domain: bool, eps: float,
) -> Tensor:
    """:class:`SegmentBatchNorm`'s output from differentiable ops (for second derivatives)."""
    ws, bs = _rows(weight, per_domain, domains), _rows(bias, per_domain, domains)
    return torch.cat([F.batch_norm(part, None, None, w, b, True, 0.0, eps)
                      for part, w, b in zip(xs.split(sizes), ws, bs, strict=True)])


class SegmentBatchNorm(torch.autograd.Function):
    """Torch's BatchNorm kernel on each segment of consecutive samples, written in place.

    Segment ``k`` (the next ``sizes[k]`` samples, of domain ``domains[k]``) is normalized with
    its own statistics and its domain's affine parameters (``per_domain``) or the shared ones;
    the kernel blends its statistics into that domain's row of ``running_mean``/``running_var``
    with ``momentum``. Forward and first-order backward are the kernel's ``out=`` variants on
    views of one output and one input gradient: no copy, no concatenation. Second derivatives
    (``create_graph=True``) differentiate :func:`_segment_batch_norm_reference` instead.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, xs: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
        running_var: Tensor, sizes: list[int], domains: list[int], per_domain: bool,
        momentum: float, eps: float,
    ) -> Tensor:
        y = torch.empty_like(xs)
        k = len(sizes)
        save = running_mean.new_empty((2 * k, xs.size(1)))  # per segment: mean, 1 / std
        saved, means, variances = save.unbind(), running_mean.unbind(), running_var.unbind()
        for i, (part, out, w, b, d) in enumerate(zip(
                xs.split(sizes), y.split(sizes), _rows(weight, per_domain, domains),
                _rows(bias, per_domain, domains), domains, strict=True)):
            torch.ops.aten.native_batch_norm.out(
                part, w, b, means[d], variances[d], True, momentum, eps, out=out,
                save_mean=saved[i], save_invstd=saved[k + i])
        ctx.save_for_backward(xs, weight, bias, save)
        ctx.layout, ctx.eps = (sizes, domains, per_domain), eps
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xs, weight, bias, save = ctx.saved_tensors
        (sizes, domains, per_domain), eps = ctx.layout, ctx.eps
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: the plain formula, exact to every order
            inputs = [t for t, need in zip((xs, weight, bias), needs, strict=True) if need]
            with torch.enable_grad():
                y = _segment_batch_norm_reference(xs, weight, bias, sizes, domains, per_domain,
                                                  eps)
                grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True))
            return (*(next(grads) if need else None for need in needs), *(None,) * 7)
        # All three outputs of the kernel (masked ones cannot be written in place), with a
        # weight of ones where the layer has none: the parameter sums cost the kernel nothing.
        k, c = len(sizes), xs.size(1)
        dx = torch.empty_like(xs)
        ws = _rows(weight, per_domain, domains) if weight is not None else [save.new_ones(c)] * k
        # sum(dy * xhat) then sum(dy): per domain (absent ones 0) or per segment
        rows = weight.size(0) if per_domain else k
        sums = save.new_zeros((2 * rows, c)) if per_domain else save.new_empty((2 * rows, c))
        saved, out = save.unbind(), sums.unbind()
        for i, (g, part, gx, w, d) in enumerate(zip(
                dy.split(sizes), xs.split(sizes), dx.split(sizes), ws, domains, strict=True)):
            r = d if per_domain else i
            torch.ops.aten.native_batch_norm_backward.out(
                g, part, w, None, None, saved[i], saved[k + i], True, eps, [True, True, True],
                out0=gx, out1=out[r], out2=out[rows + r])
        sums = sums.view(2, rows, c)
        if not per_domain:
            sums = sums.sum(1)
        grad_w = sums[0].to(weight.dtype) if needs[1] else None
        grad_b = sums[1].to(bias.dtype) if needs[2] else None
        return (dx if needs[0] else None, grad_w, grad_b, *(None,) * 7)


def group_by_domain(x: Tensor, ids: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``x`` with its samples sorted by domain (stable), and the function that puts an output
    of that order back in the samples' order (in ``x``'s memory layout, as torch's BatchNorm).
    Ids already sorted (domains in consecutive blocks) cost no copy."""
    sorted_ids, perm = torch.sort(ids, stable=True)
    if torch.equal(sorted_ids, ids):
        return x, lambda y: y
    inverse = torch.argsort(perm)
    fmt = torch.contiguous_format
    if x.dim() in (4, 5) and not x.is_contiguous():
        last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        fmt = last if x.is_contiguous(memory_format=last) else fmt

    def regroup(y: Tensor) -> Tensor:
        return _PermuteRows.apply(y, inverse, perm).contiguous(memory_format=fmt)

    return _PermuteRows.apply(x, perm, inverse), regroup
