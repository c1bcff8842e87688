"""Torch's BatchNorm kernel on groups of samples: the samples of each domain, sorted together.

:class:`~rethinkbn.layers.DomainBatchNorm` normalizes each domain of a batch with its own
statistics. Rather than per-sample arithmetic in autograd, the samples are sorted by domain once
(:func:`group_by_domain`, no copy when they already are) and torch's kernel runs on each domain's
consecutive samples (:func:`segment_batch_norm`): torch's math and cost per domain, plus the sort
and one concatenation. That needs the domains' sizes on the host; :func:`masked_domain_norm`
normalizes every domain in one vectorized pass of static shapes instead (what ``torch.compile``
traces, and what runs without validation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..stats import channel_view, compute_dtype
from .ghost_kernels import memory_format

__all__ = ["group_by_domain", "masked_domain_norm", "segment_batch_norm"]


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


def masked_domain_norm(
    x: Tensor, ids: Tensor, num_domains: int, weight: Tensor | None, bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize the samples of every domain (``ids[i]`` is sample i's) with the domain's own
    statistics, in one vectorized pass whose shapes do not depend on the ids' values.

    ``weight``/``bias`` are ``(C,)`` (shared) or ``(num_domains, C)``. The mean and biased
    variance of each sample's ``S`` values per channel come from one pass (``var_mean``, as
    torch's kernel: Welford, in the compute dtype), and are merged over the ``n_d`` samples of
    each domain d exactly (every sample has ``S`` values; the sums over samples are masked, so
    a NaN stays in its own domain)::

        mean_d = sum_{i in d} mean_i / n_d
        var_d  = sum_{i in d} (var_i + (mean_i - mean_d)^2) / n_d
        y      = (x - mean_d) * w / sqrt(var_d + eps) + b

    each sample with its domain's statistics (and parameters) gathered by its id. Nothing is
    read on the host, so ``torch.compile`` traces it as one graph for any counts (a domain
    absent from the batch included). Plain autograd: derivatives of every order are those of
    the formula. Returns ``(y, mean, biased_var, count)``: statistics ``(num_domains, C)`` in
    the compute dtype (0 for absent domains) and ``count = n_d * S``, ``(num_domains,)``.
    The accuracy is torch's kernel's (``tests/test_domain_compile.py``): centring on a pivot
    from the data first, more exact for a mean large against the spread, made inductor's CPU
    code generation fail on ResNet-18 (torch 2.13, a KeyError in its loop fusion).
    """
    xf = x.to(compute_dtype(x))
    if x.dim() > 2:
        row_var, row_mean = torch.var_mean(xf, dim=tuple(range(2, x.dim())), correction=0)
    else:
        row_var, row_mean = torch.zeros_like(xf), xf
    mask = (ids[None, :] == torch.arange(num_domains, device=ids.device)[:, None])[:, :, None]
    samples = mask.sum(1)  # (D, 1)
    inv = samples.clamp_min(1).to(xf.dtype).reciprocal()
    mean = torch.where(mask, row_mean[None], 0).sum(1) * inv
    spread = row_var + (row_mean - mean[ids]).square()
    var = torch.where(mask, spread[None], 0).sum(1) * inv
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    xc = xf - channel_view(mean[ids], xf)
    scale_i = channel_view(scale[ids], xf)
    if bias is None:
        y = xc * scale_i
    else:
        shift = bias.to(xf.dtype)
        y = torch.addcmul(channel_view(shift[ids] if shift.dim() == 2 else shift, xf), xc,
                          scale_i)
    count = samples[:, 0] * (x.numel() // max(x.size(0) * x.size(1), 1))
    y = y.to(x.dtype).contiguous(memory_format=memory_format(x))
    return y, mean, var, count
