"""Per-channel moments and their exact merge: the one place of every mean and variance.

See :mod:`rethinkbn.stats` for the formulas; the reductions across ranks are in
:mod:`rethinkbn.stats.collectives`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_positive_int

__all__ = [
    "ACC_DTYPE",
    "Moments",
    "centered",
    "channel_view",
    "compute_dtype",
    "reduce_dims",
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
