"""Moments across ranks: ONE collective per reduction, and ranks that must agree on its layout.

:func:`all_reduce_moments` sums ``m2 + n * mean^2`` in float64 (``O(C)`` bytes per rank, for every
training step of SyncBatchNorm); :func:`all_gather_moments` gathers every rank's ``(n, mean, m2)``
and merges them exactly with Chan's formula (``O(world * C)`` bytes, for once-per-pass work such as
PreciseBN). Both refuse ranks whose layouts differ (:func:`check_same_layout`, :func:`require`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .moments import ACC_DTYPE, Moments

__all__ = ["all_gather_moments", "all_reduce_moments", "check_same_layout", "require"]


def _pack(moments: Sequence[Moments]) -> Tensor:
    # Sums that are additive across ranks: n, n * mean, m2 + n * mean^2 (float64).
    parts = []
    for given in moments:
        m = given._or_empty()
        parts += [m.count.reshape(-1), (m.count * m.mean).reshape(-1),
                  (m.m2 + m.count * m.mean.square()).reshape(-1)]
    return torch.cat(parts)


def _unpack(flat: Tensor, like: Sequence[Moments]) -> list[Moments]:
    out, offset = [], 0
    for m in like:
        k = m.mean.numel()
        n, s1, s2 = (flat[offset + i * k: offset + (i + 1) * k].view_as(m.mean) for i in range(3))
        offset += 3 * k
        mean = s1 / n.clamp_min(1)
        # float64 sums keep the cancellation in s2 - n * mean^2 below float32 input precision;
        # clamp tiny negative round-off.
        out.append(Moments(n, mean, (s2 - n * mean.square()).clamp_min(0)))
    return out


# ---------------------------------------------------------------------- layout agreement
# Ranks that disagree on what they reduce (how many layers, how many channels, which dtype) must
# all fail with an error that says what differs, not go on with garbage or wait for a timeout.
# A *layout* is a short list of numbers describing one rank's side of a collective:
#     (number of sets, values per set..., caller's tag...)
# Gathered (fixed size, one small all_gather) it shows every rank's layout; appended to an
# all_reduce buffer of equal size it costs nothing more: the summed layout equals world * own on
# every rank only if every rank has the same layout.


def _layout(moments: Sequence[Moments], tag: Sequence[float]) -> list[float]:
    sizes = [float(m.mean.numel()) for m in moments]
    # Fixed length whatever the number of sets: count, total values, an order-sensitive checksum.
    checksum = float(sum((i + 1) * s for i, s in enumerate(sizes)) % (2**40))
    return [float(len(sizes)), float(sum(sizes)), checksum, *map(float, tag)]


def _describe(layout: Sequence[float], tag_names: Sequence[str]) -> str:
    sets, values = int(layout[0]), int(layout[1])
    parts = [f"{sets} set(s) of moments with {values} values"]
    parts += [f"{name} {value:g}" for name, value in zip(tag_names, layout[3:], strict=False)]
    return ", ".join(parts)


def require(ok: Tensor, message: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error(message)`` unless every element of ``ok`` is true, without a host sync.

    On CPU the check is free and raises at once. On an accelerator reading ``ok`` would stall the
    host until the device catches up, so the check is an asynchronous device assertion
    (``torch._assert_async``): a failure surfaces, with ``message``, at a later synchronization.
    On the ``meta`` device (no values) nothing is checked.
    """
    if ok.device.type == "meta":
        return
    if ok.device.type == "cpu":
        if not bool(ok.all()):
            raise error(message)
        return
    torch._assert_async(ok.all(), message)


def check_same_layout(
    moments: Sequence[Moments],
    process_group: dist.ProcessGroup | None = None,
    *,
    what: str = "all_gather_moments",
    tag: Sequence[float] = (),
    tag_names: Sequence[str] = (),
) -> None:
    """Raise ``ValueError`` on every rank unless all ranks of ``process_group`` agree on the layout.

    One all_gather of a few numbers per rank (and one read of them on the host): the number of
    sets of moments, their sizes, and the caller's ``tag`` (e.g. a layer's channel count and
    dtype code, named by ``tag_names``). The error lists what every rank holds, so that each rank
    reports the same disagreement.
    """
    layout = _layout(moments, tag)
    device = moments[0].mean.device if moments else "cpu"
    mine = _full(layout, device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(rows, mine, group=process_group)
    gathered = torch.stack(rows).tolist()
    if any(row != gathered[0] for row in gathered):
        detail = "; ".join(f"rank {r}: {_describe(row, tag_names)}"
                           for r, row in enumerate(gathered))
        raise ValueError(
            f"{what}: the ranks of the process group disagree on what they reduce ({detail}); "
            "expected the same layers, channel counts and dtypes on every rank"
        )


def _full(values: Sequence[float], device: torch.device | str) -> Tensor:
    # Fills instead of torch.tensor(values, device=...): no pageable host-to-device copy.
    out = torch.empty(len(values), dtype=ACC_DTYPE, device=device)
    for i, v in enumerate(values):
        out[i : i + 1].fill_(v)
    return out


def all_reduce_moments(
    moments: Sequence[Moments],
    process_group: dist.ProcessGroup | None = None,
    *,
    what: str = "all_reduce_moments",
    tag: Sequence[float] = (),
    tag_names: Sequence[str] = (),
) -> list[Moments]:
    """Merge every rank's moments, for any number of layers, with ONE all_reduce.

    Each set is packed as the additive sums ``(n, n * mean, m2 + n * mean^2)`` in float64, summed
    across ranks, and unpacked as ``mean = S1 / n``, ``m2 = S2 - n * mean^2``. Without an
    initialized process group (or with world size 1) the moments are returned unchanged.

    The buffer also carries this rank's layout (number of sets, their sizes, ``tag``): after the
    sum, a rank whose layout is not the group's raises ``ValueError`` (named by ``what``) instead
    of returning a mixture. This detects every disagreement between buffers of equal length at no
    extra communication; buffers of *different* lengths cannot meet in one all_reduce, so callers
    that may see them (a first step) check first with :func:`check_same_layout`. On an
    accelerator the check is an asynchronous device assertion (see :func:`require`).
    """
    moments = list(moments)
    if not moments or not dist.is_available() or not dist.is_initialized():
        return moments
    world = dist.get_world_size(process_group)
    if world == 1:
        return moments
    layout = _layout(moments, tag)
    flat = torch.cat([_full(layout, moments[0].mean.device), _pack(moments)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    k = len(layout)
    expected = _full(layout, flat.device) * world
    require(
        flat[:k] == expected,
        f"{what}: the ranks of the process group disagree on what they reduce (this rank has "
        f"{_describe(layout, tag_names)}); expected the same layers, channel counts and dtypes "
        "on every rank",
    )
    return _unpack(flat[k:], moments)


def all_gather_moments(
    moments: Sequence[Moments],
    process_group: dist.ProcessGroup | None = None,
    *,
    what: str = "all_gather_moments",
) -> list[Moments]:
    """Merge every rank's moments exactly, for any number of layers, with ONE all_gather.

    Each rank contributes its ``(n, mean, m2)`` as they are; every rank then merges the
    ``world_size`` rows of each set with :meth:`Moments.total` (Chan's formula), in the same order
    on every rank, so all ranks end with bit-identical moments and no sum of squares can cancel.
    Without an initialized process group (or with world size 1) the moments are returned
    unchanged. A small all_gather first checks that every rank holds the same number of sets of
    the same sizes (:func:`check_same_layout`): otherwise every rank raises ``ValueError``
    naming ``what`` and listing each rank's layout.
    """
    moments = list(moments)
    if not dist.is_available() or not dist.is_initialized():
        return moments
    world = dist.get_world_size(process_group)
    if world == 1:
        return moments
    check_same_layout(moments, process_group, what=what)
    if not moments:
        return moments
    flat = torch.cat([t.reshape(-1) for m in moments for t in (m.count, m.mean, m.m2)])
    rows = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(rows, flat, group=process_group)
    gathered = torch.stack(rows)  # (world, total)
    out, offset = [], 0
    for m in moments:
        k = m.mean.numel()
        parts = [gathered[:, offset + i * k: offset + (i + 1) * k].reshape(world, *m.shape)
                 for i in range(3)]
        offset += 3 * k
        out.append(Moments(*parts).total())
    return out
