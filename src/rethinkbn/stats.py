"""The statistics core: per-channel moments, their exact merge and their reduction across ranks.

Everything in rethinkbn that needs a mean or a variance of BatchNorm inputs (the layers, PreciseBN,
SyncBatchNorm, the statistics banks) goes through this module, so the formulas live here once.

A set of moments describes the values ``x_1 .. x_n`` seen by one channel:

    count = n
    mean  = (1/n) * sum_i x_i
    m2    = sum_i (x_i - mean)^2              (the sum of squared deviations)

    biased variance   = m2 / n
    unbiased variance = m2 / (n - 1)

Two sets ``a`` and ``b`` merge exactly (Chan, Golub & LeVeque, 1979)::

    n     = n_a + n_b
    delta = mean_b - mean_a
    mean  = mean_a + delta * n_b / n
    m2    = m2_a + m2_b + delta^2 * n_a * n_b / n

Accumulators are float64. :meth:`Moments.of` makes two passes (a mean, then the squared deviations
from it; for float32/half inputs per sample in their compute dtype around a pivot taken from the
data, then merged in float64), never ``E[x^2] - E[x]^2``, which cancels catastrophically in float32
when a feature's mean is large compared with its spread. Two cross-rank reductions, each ONE
collective: :func:`all_reduce_moments` sums ``m2 + n * mean^2`` in float64 (``O(C)`` bytes per rank,
for every training step of SyncBatchNorm, which shifts its moments first to keep the sum free of
cancellation), and :func:`all_gather_moments` gathers every rank's ``(n, mean, m2)`` and merges them
exactly with Chan's formula (``O(world * C)`` bytes, for once-per-pass work such as PreciseBN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ._checks import check_positive_int

__all__ = [
    "Moments",
    "all_gather_moments",
    "all_reduce_moments",
    "centered",
    "channel_view",
    "check_same_layout",
    "compute_dtype",
    "reduce_dims",
    "require",
    "segment_var_mean",
    "split_mean",
]

ACC_DTYPE = torch.float64


def reduce_dims(x: Tensor) -> tuple[int, ...]:
    """The dims a BatchNorm reduces over: every dim but the channel dim 1."""
    return (0, *range(2, x.dim()))


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype statistics of ``x`` are reduced in: float32 for float16/bfloat16, else x's own.

    torch's BatchNorm does the same for reduced-precision inputs.
    """
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def channel_view(t: Tensor, x: Tensor) -> Tensor:
    """View a per-channel ``(C,)`` (or per-sample ``(N, C)``) tensor to broadcast against ``x``."""
    lead = (1, t.size(0)) if t.dim() == 1 else (t.size(0), t.size(1))  # also for 0 samples
    return t.reshape(*lead, *([1] * (x.dim() - 2)))


def split_mean(mean: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A float64 mean as ``hi + lo``, two numbers of ``dtype`` (see :func:`centered`)."""
    hi = mean.to(dtype)
    return hi, (mean - hi.to(mean.dtype)).to(dtype)


def centered(x: Tensor, hi: Tensor, lo: Tensor) -> Tensor:
    """``x - mean`` in the compute dtype, with the float64 mean given as ``hi + lo``.

    Subtracting both parts keeps the spread's digits when the mean is large: for values near 1e4
    a float32 mean alone is off by up to 5e-4, an error the variance would inherit.
    """
    xc = x.to(compute_dtype(x)) - channel_view(hi, x)
    return xc.sub_(channel_view(lo, x))


def _power_of_two_scale(peak: Tensor) -> Tensor:
    """Per channel, a power of two near ``peak`` (float64): 1 where peak is 0, NaN or Inf."""
    peak = peak.to(ACC_DTYPE)
    _, exponent = torch.frexp(peak)
    usable = torch.isfinite(peak) & (peak > 0)
    one = torch.ones_like(peak)
    return torch.where(usable, torch.ldexp(one, exponent), one)


def _peak(t: Tensor) -> Tensor:
    """``max |t|`` per channel (one reduction, no temporary)."""
    return torch.linalg.vector_norm(t, ord=float("inf"), dim=reduce_dims(t))


def segment_var_mean(
    x: Tensor, index: Tensor, num_segments: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Biased variance and mean of every segment of samples, differentiable.

    Sample ``i`` belongs to segment ``index[i]``. With ``S`` values per sample and channel and
    ``n_s`` samples in segment ``s``, the segment has ``m_s = n_s * S`` values and::

        mean_s = sum_{i in s} sum(x_i) / m_s
        var_s  = sum_{i in s} sum((x_i - mean_s)^2) / m_s      (two passes: no cancellation)

    Returns ``(var, mean, count, centered)``: ``var`` and ``mean`` of shape ``(num_segments, C)``
    (zero for empty segments), ``count = m_s`` of shape ``(num_segments,)`` and the centered input
    ``x - mean[index]`` (in the compute dtype). Used for groups of unequal size and for domains.

    The mean is corrected once (``mean = m0 + mean_s(x - m0)`` around a first-pass ``m0``), so a
    mean that is large compared with the spread costs the spread none of its digits. No host
    synchronization: counts come from an ``index_add``, not from ``bincount``.
    """
    xf = x.to(compute_dtype(x))
    dims = tuple(range(2, x.dim()))
    values_per_sample = x.numel() // max(x.size(0) * x.size(1), 1)
    samples = torch.zeros(num_segments, dtype=torch.long, device=x.device).index_add_(
        0, index, torch.ones_like(index))
    count = samples * values_per_sample
    safe = count.clamp_min(1).to(xf.dtype)[:, None]

    def segment_mean(t: Tensor) -> Tensor:
        per_sample = t.sum(dim=dims) if dims else t
        return t.new_zeros(num_segments, x.size(1)).index_add(0, index, per_sample) / safe

    first = segment_mean(xf)
    xc = xf - channel_view(first[index], xf)
    delta = segment_mean(xc)
    xc = xc - channel_view(delta[index], xf)
    var = segment_mean(xc.square())
    return var, first + delta, count, xc


@dataclass(frozen=True)
class Moments:
    """Count, mean and m2 (sum of squared deviations) per channel, as float64 tensors.

    All three tensors have the same shape ``(..., C)``: ``(C,)`` for one layer, ``(G, C)`` for
    groups or domains. A count of zero is allowed and merges as the identity.
    """

    count: Tensor
    mean: Tensor
    m2: Tensor

    # ----------------------------------------------------------------- construction
    @classmethod
    def zeros(
        cls, shape: int | Sequence[int], device: torch.device | str | None = None
    ) -> Moments:
        """Empty moments (count 0) of the given shape."""
        z = torch.zeros(shape, dtype=ACC_DTYPE, device=device)
        return cls(z, z.clone(), z.clone())

    @classmethod
    def from_var_mean(
        cls, count: Tensor | float, mean: Tensor, var: Tensor, unbiased: bool = False
    ) -> Moments:
        """Moments from a count, a mean and a variance (detached, float64).

        ``m2 = var * count`` for a biased variance, ``m2 = var * (count - 1)`` with
        ``unbiased=True`` (what torch's BatchNorm kernel and its running buffers hold).
        """
        mean = mean.detach().to(ACC_DTYPE)
        # full_like for a Python count: no host-to-device copy
        count_t = (count.to(mean.device, ACC_DTYPE).expand_as(mean) if isinstance(count, Tensor)
                   else torch.full_like(mean, count))
        dof = count_t - 1 if unbiased else count_t
        return cls(count_t.clone(), mean, var.detach().to(ACC_DTYPE) * dof)

    @classmethod
    def of(cls, x: Tensor, num_groups: int | None = None) -> Moments:
        """Per-channel moments of ``x`` (channel dim 1, every other dim is batch), detached.

        With ``num_groups``, the moments of each of ``num_groups`` equal contiguous groups of
        samples, shape ``(num_groups, C)`` (``num_groups=N`` gives per-sample moments).

        Two passes: a mean, then the squared deviations from it, never ``E[x^2] - E[x]^2``.
        float64 and 2-D ``(N, C)`` inputs: ``mean = sum(x) / n`` in float64, then
        ``m2 = sum((x - mean)^2)`` with ``x - mean`` formed by :func:`centered`. Other inputs
        (float32, half) never materialize a float64 copy of ``x``: with a per-channel pivot ``p``
        taken from ``x`` itself (its first value) the deviations ``d = x - p`` are exact in the
        compute dtype, and each pass sums per sample in the compute dtype (``S`` values) and over
        the ``N`` samples in float64::

            mean = p + sum_i sum_s d_is / n
            m2   = sum_i sum_s (d_is - (mean - p))^2      (in place on d)

        A large mean costs the spread none of its digits and nothing cancels.
        """
        if num_groups is not None:
            check_positive_int(num_groups, "num_groups", "Moments.of", allow_none=True)
        with torch.no_grad():
            if num_groups is not None:
                if x.size(0) % num_groups:
                    raise ValueError(
                        f"Moments.of: a batch of {x.size(0)} samples does not split into "
                        f"{num_groups} equal groups"
                    )
                x = x.reshape(num_groups, x.size(0) // num_groups, *x.shape[1:]).transpose(0, 1)
                x = x.reshape(x.size(0), -1, *x.shape[3:])  # (n, groups * C, ...)
            count = x.numel() // max(x.size(1), 1)
            if count == 0:
                moments = cls.zeros(x.size(1), device=x.device)
            elif x.dtype == ACC_DTYPE or x.dim() == 2:
                dims = reduce_dims(x)
                mean = x.sum(dims, dtype=ACC_DTYPE) / count
                xc = centered(x, *split_mean(mean, compute_dtype(x)))
                if xc.dtype == ACC_DTYPE:
                    m2 = xc.square_().sum(dims, dtype=ACC_DTYPE)
                else:  # scaled by a power of two: no overflow or underflow of the squares
                    scale = _power_of_two_scale(_peak(xc))
                    xc.mul_(channel_view(scale.reciprocal().to(xc.dtype), xc))
                    m2 = xc.square_().sum(dims, dtype=ACC_DTYPE) * scale.square()
                moments = cls(torch.full_like(mean, count), mean, m2)
            else:
                moments = cls._of_per_sample(x, count)
        if num_groups is None:
            return moments
        shape = (num_groups, -1)
        return cls(moments.count.view(shape), moments.mean.view(shape), moments.m2.view(shape))

    @classmethod
    def _of_per_sample(cls, x: Tensor, count: int) -> Moments:
        # See `of`: per-sample sums of x - pivot in the compute dtype, summed over N in float64.
        pivot = x[0].reshape(x.size(1), -1)[:, 0].to(compute_dtype(x))
        d = x - channel_view(pivot, x)  # one temporary, in the compute dtype and x's layout
        spatial = tuple(range(2, x.dim()))
        mean_d = d.sum(spatial).sum(0, dtype=ACC_DTYPE) / count
        # Squares in the compute dtype overflow past ~1.8e19 and vanish below ~1e-23 (float32):
        # the deviations are scaled by a power of two s near max |x - pivot| (which bounds
        # |x - mean| within a factor 2), exact since only exponents change, and m2 by s^2 after.
        scale = _power_of_two_scale(_peak(d))
        inv = scale.reciprocal()
        hi, lo = split_mean(mean_d * inv, d.dtype)
        # (x - mean) / s, in place, in two passes as before: d * inv is exact, so one rounding
        torch.addcmul(channel_view(-hi, d), d, channel_view(inv.to(d.dtype), d), out=d)
        d.sub_(channel_view(lo, d))
        m2 = d.square_().sum(spatial).sum(0, dtype=ACC_DTYPE) * scale.square()
        return cls(torch.full_like(mean_d, count), pivot.to(ACC_DTYPE) + mean_d, m2)

    # ----------------------------------------------------------------- read-out
    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def var(self, unbiased: bool = False) -> Tensor:
        """Biased (``m2 / n``) or unbiased (``m2 / (n - 1)``) variance; NaN where undefined."""
        denom = self.count - 1 if unbiased else self.count
        return self.m2 / denom.where(denom > 0, torch.full_like(denom, float("nan")))

    # ----------------------------------------------------------------- merging
    def merge(self, other: Moments) -> Moments:
        """The exact moments of the union of both sets of values (Chan et al.).

        An operand with count 0 is the identity whatever its mean and m2 hold (an empty batch's
        mean is NaN): the result is the other operand, elementwise.
        """
        a, b = self._or_empty(), other._or_empty()
        n = a.count + b.count
        safe_n = n.clamp_min(1)
        delta = b.mean - a.mean
        mean = a.mean + delta * (b.count / safe_n)
        m2 = a.m2 + b.m2 + delta.square() * (a.count * b.count / safe_n)
        return Moments(n, mean, m2)

    def _or_empty(self) -> Moments:
        """Self with mean and m2 set to 0 where the count is 0 (then they carry no value)."""
        empty = self.count == 0
        zero = torch.zeros((), dtype=self.mean.dtype, device=self.mean.device)
        return Moments(self.count, self.mean.where(~empty, zero), self.m2.where(~empty, zero))

    def segment_merge(self, index: Tensor, num_segments: int) -> Moments:
        """Merge the rows of ``self`` (shape ``(R, ...)``) into ``num_segments`` rows by ``index``.

        Row ``r`` goes to segment ``index[r]``; the result has shape ``(num_segments, ...)``. This
        is the vectorized form of merging many sets at once::

            n_s    = sum_{r in s} n_r
            mean_s = sum_{r in s} n_r * mean_r / n_s
            m2_s   = sum_{r in s} (m2_r + n_r * (mean_r - mean_s)^2)
        """
        index = index.to(self.mean.device)
        rows = self._or_empty()  # an empty row adds nothing, whatever its mean
        out_shape = (num_segments, *rows.mean.shape[1:])
        count = rows.count.new_zeros(out_shape).index_add_(0, index, rows.count)
        safe = count.clamp_min(1)
        mean = rows.mean.new_zeros(out_shape).index_add_(0, index, rows.count * rows.mean) / safe
        dev = rows.m2 + rows.count * (rows.mean - mean[index]).square()
        m2 = rows.m2.new_zeros(out_shape).index_add_(0, index, dev)
        return Moments(count, mean, m2)

    def total(self) -> Moments:
        """Merge all rows (leading dim) into one set of moments of shape ``(...)``."""
        index = torch.zeros(self.mean.shape[0], dtype=torch.long, device=self.mean.device)
        merged = self.segment_merge(index, 1)
        return Moments(merged.count[0], merged.mean[0], merged.m2[0])


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
