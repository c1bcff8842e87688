"""The math of the BatchNorm layer family, in one place; the layer classes only hold state.

Every function here is stateless: it takes tensors and returns tensors (the normalized output and
the batch statistics that were used), and never writes into running buffers. The layers decide
what to do with the statistics (blend them into buffers under the family's NaN policy, report
them to an observer). Nothing here reads a tensor's values on the host (no sync on a GPU).

Normalization of a set of values ``x`` of one channel with statistics ``(mean, var)``::

    y = (x - mean) / sqrt(var + eps) * weight + bias

Statistics are reduced in float32 for float16/bfloat16 inputs and the output has the input's dtype,
as in torch's BatchNorm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .._checks import check_positive_int
from ..stats import channel_view, compute_dtype, segment_var_mean

__all__ = [
    "GroupStats",
    "affine_normalize",
    "apply_affine",
    "check_grouping",
    "check_groups",
    "check_norm_batch_size",
    "ghost_batch_norm",
    "group_index",
    "group_sizes",
    "native_batch_norm",
    "require_two_values",
    "scale_shift",
    "segment_batch_norm",
    "segment_var_mean",
]

GROUPINGS = ("contiguous", "strided")

# (mean, unbiased variance, number of values) of each group: shapes (G, C), (G, C), (G,).
GroupStats = tuple[Tensor, Tensor, Tensor]

# Who raises: a name, or a callable that gives it (a layer's repr costs more than the checks;
# it is built only for the error message).
Owner = str | Callable[[], str]


def _name(owner: Owner) -> str:
    return owner if isinstance(owner, str) else owner()


def require_two_values(
    values: int, x: Tensor, owner: Owner, where: str = "", detail: str = ""
) -> None:
    """Raise unless ``values`` (the fewest per channel that get a variance) is at least 2.

    A single value has no variance: torch's kernel would raise without naming the layer, and
    the segment reductions would silently give 0.
    """
    if values < 2:
        raise ValueError(
            f"{_name(owner)}: expected more than 1 value per channel{where} to normalize with "
            f"batch statistics, got {values} (input shape {tuple(x.shape)}{detail})"
        )


def _spatial_numel(x: Tensor) -> int:
    return x.numel() // max(x.size(0) * x.size(1), 1)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _stats_dtype(x: Tensor, weight: Tensor | None) -> torch.dtype:
    # torch's CPU kernel accepts reduced-precision inputs with float32 parameters ("mixed type");
    # its statistics must then be float32 too.
    if weight is not None:
        return weight.dtype
    return compute_dtype(x)


# --------------------------------------------------------------------------------------------
# Whole batch: torch's native kernel
# --------------------------------------------------------------------------------------------
def native_batch_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize ``x`` with its own batch statistics using torch's fused kernel.

    Returns ``(y, mean, unbiased_var)`` with statistics of shape ``(C,)``. The statistics come
    from throw-away running buffers updated with momentum 1, so they are exactly the values torch's
    BatchNorm would blend into its buffers, and nothing is written anywhere else.
    """
    # One allocation for both buffers; any finite start value is replaced with momentum 1.
    mean, var = torch.ones(2, x.size(1), dtype=_stats_dtype(x, weight), device=x.device).unbind()
    y = F.batch_norm(x, mean, var, weight, bias, True, 1.0, eps)
    return y, mean, var


def scale_shift(
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Normalization with fixed statistics as an affine map ``y = x * scale + shift``, in ``dtype``:

        scale = weight / sqrt(var + eps),    shift = bias - mean * scale

    (``weight`` 1 and ``bias`` 0 when absent). Used by the layers and by BatchNorm folding.
    """
    scale = torch.rsqrt(var.to(dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(dtype)
    shift = -mean.to(dtype) * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    return scale, shift


def affine_normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Normalize with given statistics as one fused scale and shift: ``y = x * scale + shift``.

    ``scale = weight / sqrt(var + eps)`` and ``shift = bias - mean * scale`` are computed in (at
    least) float32, so a variance that underflows in float16 gives ``1 / sqrt(eps)``, never inf or
    NaN. ``mean``, ``var``, ``weight`` and ``bias`` have shape ``(C,)``, or ``(N, C)`` for
    per-sample statistics. Differentiable in ``x``, ``weight`` and ``bias`` (and the statistics).
    """
    acc = torch.promote_types(compute_dtype(x), torch.float32)
    if x.dtype != acc and mean.dim() == 1 and not (mean.requires_grad or var.requires_grad):
        # Reduced-precision input: torch's eval kernel is one pass that computes in float32 with
        # a float32 scale and shift (a float16 scale times a large mean cancels badly), where
        # x.to(float32), a multiply-add and a cast back would be three.
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    scale, shift = scale_shift(mean, var, weight, bias, eps, acc)
    if x.dtype == acc:
        return torch.addcmul(channel_view(shift, x), x, channel_view(scale, x))
    y = torch.addcmul(channel_view(shift, x), x.to(acc), channel_view(scale, x))
    return y.to(x.dtype)


def apply_affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``y * weight + bias`` with ``(C,)`` or per-sample ``(N, C)`` parameters; dtype of ``y``."""
    if weight is not None:
        y2 = y * channel_view(weight, y) if bias is None else torch.addcmul(
            channel_view(bias, y), y, channel_view(weight, y))
    elif bias is not None:
        y2 = y + channel_view(bias, y)
    else:
        return y
    return y2.to(y.dtype)


# --------------------------------------------------------------------------------------------
# Groups of samples (ghost BatchNorm)
# --------------------------------------------------------------------------------------------
def check_grouping(grouping: str, owner: Owner) -> None:
    """Raise, naming ``owner``, unless ``grouping`` is one of :data:`GROUPINGS`."""
    if grouping not in GROUPINGS:
        raise ValueError(f"{_name(owner)}: grouping must be one of {GROUPINGS}, got {grouping!r}")


def check_norm_batch_size(value: object, owner: Owner, arg: str = "norm_batch_size") -> None:
    """Raise, naming ``owner`` and ``arg``, unless ``value`` is None or an int >= 1."""
    if value is None or (type(value) is int and value >= 1):  # valid: no layer name built
        return
    check_positive_int(value, arg, _name(owner), allow_none=True, expected=(
        "a positive int (samples per normalization group) or None (the whole batch)"))


def group_sizes(batch_size: int, norm_batch_size: int | None) -> list[int]:
    """Sizes of the contiguous groups a batch of ``batch_size`` samples is split into.

    Groups of ``norm_batch_size`` samples; the remainder ``r = batch_size % norm_batch_size``
    forms its own (smaller) group when ``r >= 2`` and otherwise joins the previous group, which
    then has ``norm_batch_size + 1`` samples. ``None`` (or a size >= the batch) is one group.

    >>> group_sizes(10, 4), group_sizes(9, 4), group_sizes(3, 8)
    ([4, 4, 2], [4, 5], [3])
    """
    if norm_batch_size is None or norm_batch_size >= batch_size:
        return [batch_size]
    full, rest = divmod(batch_size, norm_batch_size)
    sizes = [norm_batch_size] * full
    if rest >= 2:
        sizes.append(rest)
    elif rest == 1:
        sizes[-1] += 1
    return sizes


def check_groups(x: Tensor, norm_batch_size: int | None, grouping: str, owner: Owner) -> None:
    """Raise, naming ``owner``, unless ``x`` splits into groups that each have a variance.

    Checks ``norm_batch_size`` and ``grouping`` and that the smallest group (see
    :func:`group_sizes`; strided groups of ``N`` samples hold at least ``N // G``) has at least
    2 values per channel.
    """
    check_norm_batch_size(norm_batch_size, owner)
    check_grouping(grouping, owner)
    sizes = group_sizes(x.size(0), norm_batch_size)
    smallest = min(sizes) if grouping == "contiguous" else x.size(0) // len(sizes)
    require_two_values(smallest * _spatial_numel(x), x, owner, " in every normalization group",
                       f", norm_batch_size={norm_batch_size}, groups of {sizes} samples")


def group_index(batch_size: int, sizes: list[int], grouping: str, device: Any = None) -> Tensor:
    """The group id of every sample: contiguous blocks of ``sizes``, or ``i % len(sizes)``.

    ``sizes`` come from :func:`group_sizes`: every contiguous group but the last has ``sizes[0]``
    samples, so ``min(i // sizes[0], G - 1)`` is sample i's group (no host-to-device copy).
    """
    ids = torch.arange(batch_size, device=device)
    if grouping == "strided":
        return ids % len(sizes)
    return torch.div(ids, sizes[0], rounding_mode="floor").clamp_max_(len(sizes) - 1)


def _group_view(t: Tensor, groups: int) -> Tensor:
    """A zero-copy ``(G, L, C, S)`` view of a dense ``(N, C, ...)`` tensor whose contiguous groups
    of samples are normalized over dims 1 and 3: ``(G, n, C, S)`` for the contiguous format,
    ``(G, n * S, C, 1)`` for channels_last (the samples of a group are one block of memory)."""
    if t.dim() > 2 and _memory_format(t) != torch.contiguous_format and not t.is_contiguous():
        return t.movedim(1, -1).view(groups, -1, t.size(1), 1)
    return t.view(groups, t.size(0) // groups, t.size(1), -1)


def _fused_rows(x: Tensor, xc: Tensor) -> bool:
    """Whether the row kernels (:func:`_row_affine`, :func:`_row_sums`) apply: a contiguous
    group view (not channels_last) of an input in the compute dtype."""
    return xc.size(3) > 1 and xc.dtype == x.dtype and xc.is_contiguous()


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


def _row_affine(t: Tensor, scale: Tensor, shift: Tensor, shape: torch.Size) -> Tensor:
    """``t * scale + shift`` for a contiguous ``(G, n, C, S)`` group view with ``(G, 1, C, 1)``
    factors, as torch's eval BatchNorm kernel on a ``(1, G*n*C, S)`` view: one vectorized pass
    with a factor per row (mean 0, variance 1, eps 0: its own scale and shift are exactly these),
    returned with ``shape``. torch's ``addcmul`` with factors that broadcast over two dims is
    several times slower."""
    rows = t.size(0) * t.size(1) * t.size(2)
    per_row = (lambda f: f.expand(-1, t.size(1), -1, -1).reshape(rows))
    unit = torch.ones(2, rows, dtype=t.dtype, device=t.device)
    unit[0].zero_()
    y = F.batch_norm(t.view(1, rows, -1), unit[0], unit[1], per_row(scale), per_row(shift),
                     False, 0.0, 0.0)
    # not a view of the (1, rows, S) result: the caller may modify it in place
    return torch.ops.aten._unsafe_view(y, shape)


def _row_sums(dy: Tensor, xc: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum(dy), sum(dy * xc))`` over dims 1 and 3 of two contiguous ``(G, n, C, S)`` views
    (keepdims), from one fused pass of torch's BatchNorm backward kernel over ``(1, G*n*C, S)``
    views (per row: mean 0, invstd 1), then a sum over the ``n`` rows of each group."""
    g, n, c, _ = xc.shape
    unit = torch.ones(2, g * n * c, dtype=xc.dtype, device=xc.device)
    unit[0].zero_()
    _, dot, total = torch.ops.aten.native_batch_norm_backward(
        dy.view(1, g * n * c, -1), xc.view(1, g * n * c, -1), None, None, None, unit[0], unit[1],
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


class _ContiguousGroupNorm(torch.autograd.Function):
    """Batch normalization of ``G`` equal contiguous groups of samples, with a fused backward.

    torch's native kernel needs the normalized groups in one channel dim, which contiguous groups
    of an ``(N, C, ...)`` tensor cannot form without a copy; this function reduces over a
    zero-copy :func:`_group_view` instead (contiguous or channels_last input; the output and the
    input's gradient keep the input's memory format and dtype). Per group g and channel c, over
    its ``m`` values::

        m0   = sum(x) / m,   d = sum(x - m0) / m,   mean = m0 + d   (a corrected two-pass mean)
        xc   = x - mean,     var = sum(xc^2) / m = sum((x - m0)^2) / m - d^2
        y    = xc * (w / sqrt(var + eps)) + b
        dx   = w / sqrt(var + eps) * (dy - sum(dy) / m - xc * sum(dy * xc) / (m * (var + eps)))

    The correction ``d`` makes the mean accurate far below the input's rounding (a float32 sum
    alone is off by about an ulp of a large mean, which the output would inherit divided by the
    spread). ``x - m0`` is kept for the backward in float32/float64; for a float16/bfloat16 input
    it is recomputed there instead, so that the saved activation is the input itself (torch's
    memory). The fused backward is first order; when a second derivative is requested
    (``create_graph=True``) the backward is recomputed with the plain autograd formula, so
    gradients of gradients are exact.
    """

    @staticmethod
    def forward(  # type: ignore[override]
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
        xc = xs - mean  # centered on the first-pass mean m0, in the compute dtype
        delta = _group_sum(xc, acc).div_(m)
        var = _group_sumsq(xc).div_(m).sub_(delta.square()).clamp_min_(0)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.view(1, 1, -1, 1)
        # (xc - delta) * scale + bias as one multiply-add: the shift absorbs the correction.
        shift = -delta * scale
        if bias is not None:
            shift = shift + bias.view(1, 1, -1, 1)
        # addcmul is several times slower when its operands broadcast from different shapes.
        shift = shift.expand_as(scale).to(scale.dtype, copy=True)
        if _fused_rows(x, xc):
            y = _row_affine(xc, scale, shift, x.shape)
        else:
            # Written into a tensor of x's shape, dtype and memory format: returning a view of
            # the group view would forbid in-place ops (ReLU(inplace=True)) on the output.
            y = torch.empty_like(x)
            torch.addcmul(shift, xc, scale, out=_group_view(y, groups))
        keep = xc if xc.dtype == x.dtype else None
        ctx.save_for_backward(x, weight, bias, keep, mean.clone(), delta, invstd)
        ctx.groups, ctx.eps = groups, eps  # type: ignore[attr-defined]
        mean = mean.add_(delta)
        ctx.mark_non_differentiable(mean, var)
        return y, mean.view(groups, -1), var.view(groups, -1)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_y: Tensor, _grad_mean: Tensor, _grad_var: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, weight, bias, xc, m0, delta, invstd = ctx.saved_tensors  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        groups = ctx.groups  # type: ignore[attr-defined]
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the plain formula, whose ops all have a double
            # backward (slower, but exact to every order).
            inputs = [t for t, need in zip((x, weight, bias), needs, strict=False) if need]
            with torch.enable_grad():
                y = _contiguous_group_norm_reference(
                    x, weight, bias, groups, ctx.eps)  # type: ignore[attr-defined]
                grads = iter(torch.autograd.grad(y, inputs, grad_y, create_graph=True))
            return (*(next(grads) if need else None for need in needs[:3]), None, None)
        if xc is None:
            xc = _group_view(x, groups) - m0
        dy = _group_view(grad_y.contiguous(memory_format=_memory_format(x)), groups)
        dy = dy.to(xc.dtype)
        m = xc.size(1) * xc.size(3)
        fused = _fused_rows(x, xc)
        if fused:
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
            if fused:
                grad_x = _row_affine(dy, k, shift, x.shape)
                grad_x.view(xc.shape).addcmul_(xc, -proj)
            else:
                grad_x = torch.empty_like(x, dtype=xc.dtype)
                gx = _group_view(grad_x, groups)
                torch.addcmul(shift, dy, k, out=gx)
                gx.addcmul_(xc, -proj)
        grad_w = (sum_dy_xc * invstd).sum(dim=(0, 1, 3)) if needs[1] else None
        grad_b = sum_dy.sum(dim=(0, 1, 3)) if needs[2] else None
        return grad_x, grad_w, grad_b, None, None


def _unbiased(var: Tensor, count: Tensor | int) -> Tensor:
    """Bessel's correction of a biased variance over ``count`` values (``count >= 2``)."""
    if isinstance(count, int):
        return var * (count / (count - 1))
    count = count.to(var.dtype)
    return var * (count / (count - 1))


def ghost_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    norm_batch_size: int | None,
    grouping: str = "contiguous",
) -> tuple[Tensor, GroupStats]:
    """Normalize every group of ``norm_batch_size`` samples with the group's own statistics.

    Groups follow :func:`group_sizes`; with ``grouping="strided"`` there are as many groups but
    sample ``i`` belongs to group ``i % G`` (group sizes then differ by at most one). Returns ``y``
    and the :data:`GroupStats` ``(mean, unbiased_var, count)`` of every group.

    One vectorized computation for all groups: torch's kernel on a zero-copy ``(n, G*C, ...)``
    view for equal strided groups, a fused function over a ``(G, n, C, S)`` view for equal
    contiguous groups, and segment reductions when the groups have unequal sizes.
    """
    sizes = group_sizes(x.size(0), norm_batch_size)
    groups, spatial = len(sizes), _spatial_numel(x)
    if groups == 1:
        y, mean, var = native_batch_norm(x, weight, bias, eps)
        return y, (mean[None], var[None], torch.full((1,), x.numel() // x.size(1), device=x.device))
    # Strided groups are equal when G divides N; contiguous ones when no remainder was left.
    equal = x.size(0) % groups == 0 if grouping == "strided" else len(set(sizes)) == 1
    fmt = _memory_format(x)
    if not equal:
        index = group_index(x.size(0), sizes, grouping, x.device)
        y, mean, var, count = segment_batch_norm(x, index, groups, weight, bias, eps)
        return y, (mean, _unbiased(var, count[:, None]), count)
    n = x.size(0) // groups
    count = torch.full((groups,), n * spatial, device=x.device)
    if grouping == "contiguous":
        # Contiguous and channels_last inputs are used in place; other strides are copied.
        dense = x.is_contiguous() or fmt != torch.contiguous_format
        y, mean, var = _ContiguousGroupNorm.apply(x if dense else x.contiguous(), weight, bias,
                                                  groups, eps)
        return y, (mean, _unbiased(var, n * spatial), count)
    channels = groups * x.size(1)
    rep = (lambda t: None if t is None else t.repeat(groups))
    y, mean, var = native_batch_norm(
        x.contiguous().view(n, channels, *x.shape[2:]), rep(weight), rep(bias), eps
    )
    # A channels_last input's strided groups are not one channel dim of any view: copied.
    y = y.view(x.shape).contiguous(memory_format=fmt)
    return y, (mean.view(groups, -1), var.view(groups, -1), count)


# --------------------------------------------------------------------------------------------
# Segments of samples (unequal groups, domains)
# --------------------------------------------------------------------------------------------
def segment_batch_norm(
    x: Tensor,
    index: Tensor,
    num_segments: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize every segment of samples (``index[i]`` is sample i's) with its own statistics.

    ``weight``/``bias`` are ``(C,)`` or per-sample ``(N, C)``. Returns ``(y, mean, biased_var,
    count)`` with statistics as in :func:`segment_var_mean`. One vectorized pass, differentiable.
    """
    var, mean, count, centered = segment_var_mean(x, index, num_segments)
    scale = torch.rsqrt(var + eps)[index]
    if weight is not None:
        scale = scale * (weight if weight.dim() == 2 else weight[None]).to(scale.dtype)
    y = centered * channel_view(scale, x)
    if bias is not None:
        y = y + channel_view(bias.to(y.dtype), x)
    return y.to(x.dtype).contiguous(memory_format=_memory_format(x)), mean, var, count
