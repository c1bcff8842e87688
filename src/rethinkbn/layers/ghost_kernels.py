"""Kernels of ghost BatchNorm over contiguous groups of samples (see :func:`contiguous_group_norm`).

torch's fused BatchNorm kernel normalizes over one channel dim, which contiguous groups of an
``(N, C, ...)`` tensor cannot form without a copy; these autograd functions reduce over
zero-copy views of the input instead, with fused first-order backwards and the plain autograd
formula for second derivatives. Only the input is saved for the backward (the centred input is
recomputed there), so a step keeps what torch's BatchNorm keeps.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from ..stats import compute_dtype

__all__ = ["contiguous_group_norm", "memory_format"]

def memory_format(x: Tensor) -> torch.memory_format:
    """The memory format ``x`` is dense in: channels_last(_3d) when it is, else contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format




def _group_view(t: Tensor, groups: int) -> Tensor:
    """A zero-copy ``(G, L, C, S)`` view of a dense ``(N, C, ...)`` tensor whose contiguous groups
    of samples are normalized over dims 1 and 3: ``(G, n, C, S)`` for the contiguous format,
    ``(G, n * S, C, 1)`` for channels_last (the samples of a group are one block of memory)."""
    if t.dim() > 2 and memory_format(t) != torch.contiguous_format and not t.is_contiguous():
        return t.movedim(1, -1).view(groups, -1, t.size(1), 1)
    return t.view(groups, t.size(0) // groups, t.size(1), -1)


def _fused_rows(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether the row path of :class:`_ContiguousGroupNorm` applies: a contiguous input (its
    group view has rows of ``S > 1`` contiguous values; not channels_last) already in the
    compute dtype ``dtype``, so that its centred copy can be the output's buffer."""
    return (x.dtype == dtype and x.is_contiguous()
            and x.numel() > x.size(0) * x.size(1))


def _group_sum(xs: Tensor, dtype: torch.dtype) -> Tensor:
    """Sum of a :func:`_group_view` over dims 1 and 3, keepdims, in (at least) ``dtype``: the
    contiguous dim first (several times faster on CPU than one reduction over both). Row sums
    of a reduced-precision input are accumulated and returned in ``dtype``: rounded back to
    float16 a row sum overflows past 65504 (a row of 1024 values of 100)."""
    if xs.size(3) == 1:
        return xs.sum(dim=1, keepdim=True, dtype=torch.promote_types(xs.dtype, dtype))
    rows = xs.sum(dim=3, keepdim=True, dtype=torch.promote_types(xs.dtype, dtype))
    return rows.sum(dim=1, keepdim=True)


def _group_sumsq(xc: Tensor) -> Tensor:
    """Sum of squares of a :func:`_group_view` over dims 1 and 3 (keepdims), without
    materializing ``xc ** 2`` (``vector_norm`` reduces in one pass)."""
    if xc.size(3) == 1:
        return torch.linalg.vector_norm(xc, dim=1, keepdim=True).square_()
    return torch.linalg.vector_norm(xc, dim=3, keepdim=True).square_().sum(1, keepdim=True)


def _group_dot(dy: Tensor, xc: Tensor) -> Tensor:
    """``sum(dy * xc)`` over dims 1 and 3 of two :func:`_group_view` (keepdims)."""
    if xc.size(3) == 1:
        return torch.linalg.vecdot(dy, xc, dim=1).unsqueeze(1)
    return torch.linalg.vecdot(dy, xc, dim=3).sum(1, keepdim=True).unsqueeze(3)


def _unit_stats(t: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """A mean of 0 and a variance (or 1/std) of 1 for each of ``rows`` channels, for torch's
    BatchNorm kernels used as per-row multiply-adds and sums. Dense: stride-0 views of two
    scalars send the eval kernel down a path 5x slower."""
    unit = t.new_ones(2, rows)
    unit[0].zero_()
    return unit[0], unit[1]


def _row_affine_(t: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``t = t * scale + shift`` in place, for a contiguous ``(G, n, C, S)`` group view with
    ``(G, 1, C, 1)`` factors: torch's eval BatchNorm kernel (mean 0, variance 1, eps 0: its own
    per-row scale and shift are exactly these) on a ``(1, G*n*C, S)`` view, writing into its
    input (each output value is its input's value's multiply-add, so one pass, vectorized).
    ``mul_`` + ``add_`` take two passes, and torch's ``addcmul`` with factors that broadcast
    over two dims is slower still."""
    rows = t.size(0) * t.size(1) * t.size(2)
    per_row = (lambda f: f.expand(-1, t.size(1), -1, -1).reshape(rows))
    zero, one = _unit_stats(t, rows)
    flat = t.view(1, rows, -1)
    empty = t.new_empty(0)
    torch.ops.aten.native_batch_norm.out(flat, per_row(scale), per_row(shift), zero, one,
                                         False, 0.0, 0.0, out=flat, save_mean=empty,
                                         save_invstd=empty.clone())
    return t


def _row_sums(dy: Tensor, xc: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum(dy), sum(dy * xc))`` over dims 1 and 3 of two contiguous ``(G, n, C, S)`` views
    (keepdims), from one fused pass of torch's BatchNorm backward kernel over ``(1, G*n*C, S)``
    views (per row: mean 0, invstd 1), then a sum over the ``n`` rows of each group."""
    g, n, c, _ = xc.shape
    zero, one = _unit_stats(xc, g * n * c)
    _, dot, total = torch.ops.aten.native_batch_norm_backward(
        dy.view(1, g * n * c, -1), xc.view(1, g * n * c, -1), None, None, None, zero, one,
        True, 0.0, [False, True, True])
    return (total.view(g, n, c, 1).sum(1, keepdim=True),
            dot.view(g, n, c, 1).sum(1, keepdim=True))


def _contiguous_group_norm_reference(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float
) -> Tensor:
    """The plain autograd form of :class:`_ContiguousGroupNorm` (its output, in the compute
    dtype).

    Used for second derivatives: every op here has a double backward, so gradients of the
    gradient are those of the formula itself.
    """
    xs = x.to(compute_dtype(x)).reshape(groups, x.size(0) // groups, x.size(1), -1)
    mean = xs.mean(dim=(1, 3), keepdim=True)
    xc = xs - mean
    var = xc.square().mean(dim=(1, 3), keepdim=True)
    y = xc * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.view(1, 1, -1, 1)
    if bias is not None:
        y = y + bias.view(1, 1, -1, 1)
    return y.reshape(x.shape)


def _second_order(
    ctx: FunctionCtx, grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor | None, ...]:
    """The backward when a second derivative is requested (``create_graph=True``): the gradient
    of the plain formula, whose ops all have a double backward (slower, exact to every order)."""
    needs = ctx.needs_input_grad  # type: ignore[attr-defined]
    inputs = [t for t, need in zip((x, weight, bias), needs, strict=False)
              if need and t is not None]
    with torch.enable_grad():
        y = _contiguous_group_norm_reference(
            x, weight, bias, ctx.groups, ctx.eps)  # type: ignore[attr-defined]
        grads = iter(torch.autograd.grad(y, inputs, grad_y, create_graph=True))
    return (*(next(grads) if need else None for need in needs[:3]), None, None)


class _ContiguousGroupNorm(torch.autograd.Function):
    """Batch normalization of ``G`` equal contiguous groups of samples, with a fused backward.

    Reduces over a zero-copy :func:`_group_view` of ``x`` (contiguous or channels_last input;
    the output and the input's gradient keep the input's memory format and dtype); the per-row
    work goes to torch's fused kernels (:func:`_row_affine_`, :func:`_row_sums`). Per group g and
    channel c, over its ``m`` values::

        m0   = sum(x) / m,   d = sum(x - m0) / m,   mean = m0 + d   (a corrected two-pass mean)
        xc   = x - mean,     var = sum(xc^2) / m = sum((x - m0)^2) / m - d^2
        y    = xc * (w / sqrt(var + eps)) + b
        dx   = w / sqrt(var + eps) * (dy - sum(dy) / m - xc * sum(dy * xc) / (m * (var + eps)))

    The correction ``d`` makes the mean accurate far below the input's rounding (a float32 sum
    alone is off by about an ulp of a large mean, which the output would inherit divided by the
    spread). Only ``x`` is saved: ``x - m0`` is recomputed in the backward (one pass), so a
    step holds torch's memory. On the row path (:func:`_fused_rows`) ``x - m0`` is written into
    the buffer of the output (forward) or of the input's gradient (backward) and transformed
    there in place: a step allocates what torch's BatchNorm allocates (each fresh
    activation-sized buffer costs page faults, about a pass). The fused backward is first
    order; with ``create_graph=True`` the backward differentiates the plain formula
    (:func:`_second_order`).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        groups: int,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        acc = compute_dtype(x)
        xs = _group_view(x, groups)
        m = xs.size(1) * xs.size(3)
        mean = _group_sum(xs, acc).div_(m)
        # centered on the first-pass mean m0, in the compute dtype; on the row path written into
        # the output's buffer and transformed there (a fresh activation-sized buffer costs more
        # than a pass over it: its pages are faulted in)
        y = torch.empty_like(x) if _fused_rows(x, acc) else None
        xc = xs - mean if y is None else torch.sub(xs, mean, out=y.view(xs.shape))
        # sum(xc) and sum(xc^2): on the row path from one pass of torch's fused kernel
        total, sumsq = (_group_sum(xc, acc), _group_sumsq(xc)) if y is None else _row_sums(xc, xc)
        delta = total.div_(m)
        var = sumsq.div_(m).sub_(delta.square()).clamp_min_(0)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.view(1, 1, -1, 1)
        # (xc - delta) * scale + bias as one multiply-add: the shift absorbs the correction.
        shift = -delta * scale
        if bias is not None:
            shift = shift + bias.view(1, 1, -1, 1)
        if y is not None:
            _row_affine_(xc, scale, shift)
        else:
            # Written into a tensor of x's shape, dtype and memory format: returning a view of
            # the group view would forbid in-place ops (ReLU(inplace=True)) on the output. addcmul
            # is several times slower when its operands broadcast from different shapes.
            y = torch.empty_like(x)
            torch.addcmul(shift.expand_as(scale).to(scale.dtype, copy=True), xc, scale,
                          out=_group_view(y, groups))
        ctx.save_for_backward(x, weight, bias, mean.clone(), delta, invstd)  # type: ignore[arg-type]
        ctx.groups, ctx.eps = groups, eps  # type: ignore[attr-defined]
        mean = mean.add_(delta)
        ctx.mark_non_differentiable(mean, var)
        return y, mean.view(groups, -1), var.view(groups, -1)

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad_y: Tensor, _grad_mean: Tensor, _grad_var: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, weight, bias, m0, delta, invstd = ctx.saved_tensors  # type: ignore[attr-defined]
        if torch.is_grad_enabled():
            return _second_order(ctx, grad_y, x, weight, bias)
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        groups = ctx.groups  # type: ignore[attr-defined]
        xs = _group_view(x, groups)
        dy = _group_view(grad_y.contiguous(memory_format=memory_format(x)), groups)
        m = xs.size(1) * xs.size(3)
        # x - m0 recomputed; on the row path into the buffer of the input's gradient
        buf = torch.empty_like(x) if _fused_rows(x, m0.dtype) else None
        xc = xs - m0 if buf is None else torch.sub(xs, m0, out=buf.view(xs.shape))
        dy = dy.to(xc.dtype)
        if buf is not None:
            sum_dy, dot = _row_sums(dy, xc)
        else:
            sum_dy, dot = _group_sum(dy, xc.dtype), _group_dot(dy, xc)
        # sum(dy * (x - mean)) with x - mean = xc - delta
        sum_dy_xc = dot - delta * sum_dy
        k = invstd if weight is None else invstd * weight.view(1, 1, -1, 1)
        grad_x = None
        if needs[0]:
            proj = k * invstd.square() * sum_dy_xc / m
            shift = -k * sum_dy / m + delta * proj
            if buf is not None:
                _row_affine_(xc, -proj, shift).addcmul_(dy, k)
                grad_x = buf
            else:
                grad_x = torch.empty_like(x, dtype=xc.dtype)
                gx = _group_view(grad_x, groups)
                torch.addcmul(shift, dy, k, out=gx)
                gx.addcmul_(xc, -proj)
        grad_w = (sum_dy_xc * invstd).sum(dim=(0, 1, 3)) if needs[1] else None
        grad_b = sum_dy.sum(dim=(0, 1, 3)) if needs[2] else None
        return grad_x, grad_w, grad_b, None, None


# --------------------------------------------------------------------------------------------
# Contiguous inputs: the groups' values transposed into rows
# --------------------------------------------------------------------------------------------
# The transposed kernels copy a contiguous input into rows (5 activation-sized copies a step):
# they pay off where per-row costs dominate, that is for short rows (at most TRANSPOSE_ROWS
# values per sample and channel) of an activation that, in the compute dtype, fits with its
# copies in a core's L2 cache (TRANSPOSE_BYTES; 2 MiB a core on the machine measured). Past it
# every copy is a pass over memory and the row kernel of _ContiguousGroupNorm, which copies
# nothing, is faster (1.2-1.3x less CPU time for the kernel's step on (128, 256, 8, 8) and
# (1024, 64, 40) at NBS 2 and 32; the transposed one 1.1-1.7x less on the 1-D ResNet's
# (128, 32-128, 40-10)).
TRANSPOSE_ROWS = 64
TRANSPOSE_BYTES = 1 << 20


def _transposes(x: Tensor) -> bool:
    """Whether :func:`contiguous_group_norm` runs :class:`_TransposedGroupNorm` on ``x``."""
    spatial = x.numel() // max(x.size(0) * x.size(1), 1)
    return (spatial <= TRANSPOSE_ROWS and x.is_contiguous()
            and x.numel() * compute_dtype(x).itemsize <= TRANSPOSE_BYTES)


def _to_rows(t: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """A contiguous ``(G, C, n * S)`` copy (in ``dtype``) of an ``(N, C, ...)`` tensor: row
    ``(g, c)`` holds the ``m = n * S`` values that group ``g`` normalizes in channel ``c``. One
    copy kernel; every reduction after it runs over a contiguous last dim (vectorized)."""
    n, c = t.size(0) // groups, t.size(1)
    rows = torch.empty(groups, c, n, t.numel() // max(t.size(0) * c, 1), dtype=dtype,
                       device=t.device)
    rows.copy_(t.reshape(groups, n, c, -1).transpose(1, 2))
    return rows.view(groups, c, -1)


def _from_rows(rows: Tensor, like: Tensor, groups: int) -> Tensor:
    """The inverse of :func:`_to_rows`: a new tensor shaped and typed like ``like``."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    n, c = like.size(0) // groups, like.size(1)
    out.view(groups, n, c, -1).copy_(rows.view(groups, c, n, -1).transpose(1, 2))
    return out


class _TransposedGroupNorm(torch.autograd.Function):
    """:class:`_ContiguousGroupNorm`'s forward formulas on a :func:`_to_rows` copy of a
    contiguous input (few values per sample and channel, where reductions over strided dims cost
    more than a copy), and torch's own BatchNorm backward kernel on ``(1, G * C, m)`` views of
    the rows of ``x`` and of the output's gradient: each row is one group's channel, so the
    kernel's per-channel formula is exactly the group's. Saves ``x`` and per-row mean and
    ``1 / sqrt(var + eps)`` (torch's memory)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        groups: int,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        acc = compute_dtype(x)
        xc = _to_rows(x, groups, acc)
        m = xc.size(2)
        mean = xc.sum(2, keepdim=True).div_(m)
        xc -= mean  # centered on the first-pass mean m0
        delta = xc.sum(2, keepdim=True).div_(m)
        var = torch.linalg.vector_norm(xc, dim=2, keepdim=True).square_().div_(m)
        invstd = var.sub_(delta.square()).clamp_min_(0).add(eps).rsqrt_()
        scale = invstd if weight is None else invstd * weight.to(acc)[:, None]
        shift = -delta * scale  # (xc - delta) * scale + bias
        if bias is not None:
            shift += bias.to(acc)[:, None]
        # in place: one buffer beside the output (each extra activation-sized buffer costs)
        y = _from_rows(xc.mul_(scale).add_(shift), x, groups)
        mean += delta
        ctx.save_for_backward(x, weight, bias, mean, invstd)  # type: ignore[arg-type]
        ctx.groups, ctx.eps = groups, eps  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad_y: Tensor, _grad_mean: Tensor, _grad_var: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, invstd = ctx.saved_tensors  # type: ignore[attr-defined]
        if torch.is_grad_enabled():
            return _second_order(ctx, grad_y, x, weight, bias)
        needs, groups = ctx.needs_input_grad, ctx.groups  # type: ignore[attr-defined]
        xc = _to_rows(x, groups, mean.dtype)
        dy = _to_rows(grad_y, groups, mean.dtype)
        r, m = xc.size(0) * xc.size(1), xc.size(2)
        # torch's backward per row (one group's channel): dx = w * invstd * (dy - sum(dy) / m
        # - (x - mean) * invstd^2 * sum(dy * (x - mean)) / m), sum(dy), sum(dy * (x - mean)) *
        # invstd, in one call
        w = None if weight is None else weight.to(mean.dtype).repeat(groups)
        grad_rows, dot, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy.view(1, r, m), xc.view(1, r, m), w, None, None, mean.view(-1), invstd.view(-1),
            True, 0.0, [needs[0], True, True])
        dot, sum_dy = dot.view(mean.shape), sum_dy.view(mean.shape)
        grad_x = _from_rows(grad_rows.view(xc.shape), x, groups) if needs[0] else None
        grad_w = dot.sum(dim=(0, 2)) if needs[1] else None
        grad_b = sum_dy.sum(dim=(0, 2)) if needs[2] else None
        return grad_x, grad_w, grad_b, None, None


def _composite_group_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`contiguous_group_norm` in plain torch ops, for ``torch.compile``: inductor fuses
    the reductions and the normalization of a :func:`_group_view` and derives the backward
    itself (through the hand-written kernels above, which exist for eager CPU speed, a compiled
    step of the 1-D ResNet at NBS 2 cost 1.44x compiled torch BN; this way 1.06x in
    ``benchmarks/results/model_compile.md``). Statistics in the compute dtype, as the kernels
    compute them; same return values."""
    xs = _group_view(x, groups)
    var, mean = torch.var_mean(xs.to(compute_dtype(x)), dim=(1, 3), keepdim=True,
                               correction=0)
    y = (xs - mean) * torch.rsqrt(var + eps)
    shape = (1, 1, x.size(1), 1)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    y = y.to(x.dtype)
    if xs.size(3) == 1 and x.dim() > 2 and not x.is_contiguous():  # channels_last: back
        y = y.view(*x.shape[:1], *x.shape[2:], x.size(1)).movedim(-1, 1)
    else:
        y = y.view(x.shape)
    return y, mean.detach().view(groups, -1), var.detach().view(groups, -1)


def contiguous_group_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize ``G = groups`` equal contiguous groups of samples of a dense ``x`` (contiguous
    or channels_last) with their own statistics; differentiable, exactly to every order.

    Returns ``(y, mean, biased_var)`` with statistics of shape ``(G, C)`` (not differentiable).
    Formulas in :class:`_ContiguousGroupNorm`; a small contiguous input with short rows (at
    most :data:`TRANSPOSE_ROWS` values per sample and channel and :data:`TRANSPOSE_BYTES` in the
    compute dtype) uses :class:`_TransposedGroupNorm`.
    """
    if torch.compiler.is_compiling():
        return _composite_group_norm(x, weight, bias, groups, eps)
    if _transposes(x):
        y, mean, var = _TransposedGroupNorm.apply(x, weight, bias, groups, eps)
    else:
        y, mean, var = _ContiguousGroupNorm.apply(x, weight, bias, groups, eps)
    return y, mean.view(groups, -1), var.view(groups, -1)
