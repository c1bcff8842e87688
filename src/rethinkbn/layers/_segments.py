"""Torch's BatchNorm kernel on groups of samples: the samples of each domain, sorted together.

:class:`~rethinkbn.layers.DomainBatchNorm` normalizes each domain of a batch with its own
statistics. Rather than per-sample arithmetic in autograd, the samples are sorted by domain once
(:func:`group_by_domain`, no copy when they already are) and torch's kernel runs on each domain's
consecutive samples (:func:`segment_batch_norm`): torch's math and cost per domain, plus the sort
and one concatenation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["group_by_domain", "segment_batch_norm"]


class _PermuteRows(torch.autograd.Function):
    """``x.index_select(0, perm)`` for a permutation ``perm`` of the rows (``inverse`` its
    inverse), whose adjoint is the inverse permutation: one pass over the gradient, where
    autograd's ``index_select`` zero-fills a tensor and adds into it. Differentiable again
    (double backward)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, perm: Tensor, inverse: Tensor
    ) -> Tensor:
        ctx.perm, ctx.inverse = perm, inverse
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _PermuteRows.apply(grad, ctx.inverse, ctx.perm), None, None


def _rows(t: Tensor | None, per_domain: bool, domains: list[int]) -> list[Tensor | None]:
    """Each segment's parameter: its domain's row of a per-domain ``t``, else ``t``."""
    if t is None or not per_domain:
        return [t] * len(domains)
    rows = t.unbind()
    return [rows[d] for d in domains]


def segment_batch_norm(
    xs: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
    running_var: Tensor, sizes: list[int], domains: list[int], per_domain: bool,
    momentum: float, eps: float,
) -> Tensor:
    """Torch's BatchNorm on each segment of consecutive samples of ``xs``, concatenated.

    Segment ``k`` (the next ``sizes[k]`` samples, of domain ``domains[k]``) is normalized with
    its own statistics and its domain's affine parameters (``per_domain``) or the shared ones;
    the kernel blends its statistics into that domain's row of ``running_mean``/``running_var``
    with ``momentum``. Plain autograd (the segments are views; one concatenation each way), so
    derivatives of every order are torch's.
    """
    means, variances = running_mean.unbind(), running_var.unbind()
    ws, bs = _rows(weight, per_domain, domains), _rows(bias, per_domain, domains)
    return torch.cat([
        F.batch_norm(part, means[d], variances[d], w, b, True, momentum, eps)
        for part, w, b, d in zip(xs.split(sizes), ws, bs, domains, strict=True)])


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
