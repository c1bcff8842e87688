"""SyncBatchNorm's normalization across ranks: its autograd function and group sums.

``y = weight * (x - mean) * invstd + bias`` with the group's statistics, whose backward sums
``dy`` and ``dy * xhat`` over the group (ONE all_reduce), or, with ``create_graph=True``, is
built from differentiable group sums so that second derivatives are exact across ranks. See
:mod:`rethinkbn.distributed.sync` for the layer and the numerics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..stats import centered, channel_view, compute_dtype, reduce_dims

__all__ = ["SyncNormalize", "collective_failed"]


def collective_failed(what: str, name: str, group: dist.ProcessGroup | None, exc: Exception) -> (
    RuntimeError
):
    size = dist.get_world_size(group)
    return RuntimeError(
        f"{name}: the {what} all_reduce over {size} ranks failed ({exc}). Every rank of the "
        "group must run this layer in the same step; a rank that raised, exited or skipped the "
        "layer leaves the others waiting until the process group's timeout "
        "(init_process_group(timeout=...))."
    )


class _GroupSum(torch.autograd.Function):
    """``sum over the group's ranks of t``, differentiable: its adjoint is the same sum.

    Used by the double-backward path of :class:`SyncNormalize` (``create_graph=True``), where
    the group statistics must be functions of ``x`` that autograd can differentiate again.
    """

    @staticmethod
    def forward(
        ctx: Any, t: Tensor, group: dist.ProcessGroup | None, sync: bool, name: str
    ) -> Tensor:
        ctx.group, ctx.sync, ctx.name = group, sync, name
        return _all_reduce_sum(t.clone(), group, sync, name)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _GroupSum.apply(grad, ctx.group, ctx.sync, ctx.name), None, None, None


def _all_reduce_sum(t: Tensor, group: dist.ProcessGroup | None, sync: bool, name: str) -> Tensor:
    if sync:
        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        except RuntimeError as exc:
            raise collective_failed("gradient-sum", name, group, exc) from exc
    return t


class SyncNormalize(torch.autograd.Function):
    """``y = weight * (x - mean) * invstd + bias`` with the group-wide backward.

    ``mean`` (given as ``mean + mean_lo``) and ``invstd`` are the group's statistics, constants
    here: their dependence on ``x`` is accounted for in the backward through the group sums of
    ``dy`` and ``dy * xhat``.

    The first-order backward is one fused computation and ONE all_reduce. When autograd records
    the backward (``create_graph=True``: gradient penalties, double backward), the backward is
    instead built from differentiable operations, in which the group statistics are rebuilt as
    functions of ``x`` with a differentiable group sum (three all_reduces, and their adjoints
    when differentiated again): second derivatives are then exact across ranks. The values stay
    those of the float64 statistics: the rebuilt mean and inverse std enter as
    ``value + (f(x) - f(x).detach())``, which adds exactly zero and carries ``f``'s derivative.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        mean: Tensor,
        mean_lo: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        count: Tensor,
        eps: float,
        group: dist.ProcessGroup | None,
        sync: bool,
        name: str,
    ) -> Tensor:
        dtype = compute_dtype(x)
        xmu = centered(x, mean, mean_lo)
        scale = invstd if weight is None else invstd * weight.to(dtype)
        # In place on the temporary xmu (torch.addcmul with a broadcast (1, C, 1, ...) first
        # operand is many times slower on CPU).
        y = xmu.mul_(channel_view(scale, x))
        if bias is not None:
            y.add_(channel_view(bias.to(dtype), x))
        ctx.save_for_backward(x, mean, mean_lo, invstd, weight, count)
        ctx.eps, ctx.group, ctx.sync, ctx.name = eps, group, sync, name
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            return SyncNormalize._differentiable_backward(ctx, dy)
        x, mean, mean_lo, invstd, weight, count = ctx.saved_tensors
        dtype = compute_dtype(x)
        dims = reduce_dims(x)
        xmu = centered(x, mean, mean_lo)
        dy = dy.to(dtype)
        sum_dy = dy.sum(dims)
        sum_dy_xmu = (dy * xmu).sum(dims)
        need_x, _, _, _, need_w, need_b = ctx.needs_input_grad[:6]
        grad_x = grad_w = grad_b = None
        if need_w:
            grad_w = (sum_dy_xmu * invstd).to(weight.dtype)
        if need_b:
            grad_b = sum_dy.to(weight.dtype if weight is not None else dtype)
        if need_x:
            sums = _all_reduce_sum(torch.stack([sum_dy, sum_dy_xmu]), ctx.group, ctx.sync,
                                   ctx.name)
            mean_dy, mean_dy_xmu = sums / count.to(dtype)
            scale = invstd if weight is None else invstd * weight.to(dtype)
            # dx = scale * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))),
            # in place on the temporary xmu
            grad_x = xmu.mul_(channel_view(-invstd.square() * mean_dy_xmu, x)).add_(dy)
            grad_x = grad_x.sub_(channel_view(mean_dy, x)).mul_(channel_view(scale, x))
            grad_x = grad_x.to(x.dtype)
        return grad_x, None, None, None, grad_w, grad_b, None, None, None, None, None

    @staticmethod
    def _differentiable_backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, mean_lo, invstd, weight, count = ctx.saved_tensors
        dtype = compute_dtype(x)
        dims = reduce_dims(x)
        n = count.to(dtype)

        def group_mean(t: Tensor) -> Tensor:
            return _GroupSum.apply(t, ctx.group, ctx.sync, ctx.name) / n

        def exact(value: Tensor, f: Tensor) -> Tensor:
            return value + (f - f.detach())

        mean_x = group_mean(x.to(dtype).sum(dims))
        xmu = centered(x, mean, mean_lo) - channel_view(mean_x - mean_x.detach(), x)
        inv = exact(invstd, (group_mean(xmu.square().sum(dims)) + ctx.eps).rsqrt())
        xhat = xmu * channel_view(inv, x)
        dy = dy.to(dtype)
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)
        mean_dy, mean_dy_xhat = group_mean(torch.stack([sum_dy, sum_dy_xhat]))
        scale = inv if weight is None else inv * weight.to(dtype)
        grad_x = channel_view(scale, x) * (
            dy - channel_view(mean_dy, x) - xhat * channel_view(mean_dy_xhat, x)
        )
        need_w, need_b = ctx.needs_input_grad[4:6]
        grad_w = sum_dy_xhat.to(weight.dtype) if need_w else None
        grad_b = sum_dy.to(weight.dtype if weight is not None else dtype) if need_b else None
        return grad_x.to(x.dtype), None, None, None, grad_w, grad_b, None, None, None, None, None
