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

from .._checks import check_positive_int
from ..stats import channel_view, compute_dtype, segment_var_mean
from .ghost_kernels import contiguous_group_norm
from .ghost_kernels import memory_format as _memory_format

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
    per_channel = all(t is None or t.dim() == 1 for t in (mean, weight, bias))
    if per_channel and not (mean.requires_grad or var.requires_grad) and x.numel():
        # torch's eval kernel: one pass forward, one backward (dx = dy * scale, and the affine
        # gradients only when asked for), computing in float32 for reduced-precision inputs with
        # a float32 scale and shift (a float16 scale times a large mean cancels badly).
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
        y, mean, var = contiguous_group_norm(x if dense else x.contiguous(), weight, bias,
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
