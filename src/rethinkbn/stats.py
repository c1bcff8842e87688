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

Accumulators are float64. :meth:`Moments.of` makes two passes (a float64 mean, then the squared
deviations from it), never ``E[x^2] - E[x]^2``, which cancels catastrophically in float32 when a
feature's mean is large compared with its spread. Two cross-rank reductions, each ONE
collective: :func:`all_reduce_moments` sums ``m2 + n * mean^2`` in float64 (``O(C)`` bytes per
rank, for every training step of SyncBatchNorm, which shifts its moments first to keep the sum
free of cancellation), and :func:`all_gather_moments` gathers every rank's ``(n, mean, m2)`` and
merges them exactly with Chan's formula (``O(world * C)`` bytes, for once-per-pass work such as
PreciseBN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Moments",
    "all_gather_moments",
    "all_reduce_moments",
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
    def of(cls, x: Tensor, groups: int | None = None) -> Moments:
        """Per-channel moments of ``x`` (channel dim 1, every other dim is batch), detached.

        With ``groups``, the moments of each of ``groups`` equal contiguous groups of samples,
        shape ``(groups, C)`` (``groups=N`` gives per-sample moments).

        Two passes around a float64 mean: ``mean = sum(x) / n`` accumulated in float64, then
        ``m2 = sum((x - mean)^2)`` with ``x - mean`` formed by :func:`centered`, so a large mean
        costs the spread none of its digits and nothing cancels.
        """
        with torch.no_grad():
            if groups is not None:
                if groups < 1 or x.size(0) % groups:
                    raise ValueError(
                        f"Moments.of: a batch of {x.size(0)} samples does not split into "
                        f"{groups} equal groups"
                    )
                x = x.reshape(groups, x.size(0) // groups, *x.shape[1:]).transpose(0, 1)
                x = x.reshape(x.size(0), -1, *x.shape[3:])  # (n, groups * C, ...)
            count = x.numel() // max(x.size(1), 1)
            if count == 0:
                moments = cls.zeros(x.size(1), device=x.device)
            else:
                dims = reduce_dims(x)
                mean = x.sum(dims, dtype=ACC_DTYPE) / count
                xc = centered(x, *split_mean(mean, compute_dtype(x)))
                m2 = xc.square_().sum(dims, dtype=ACC_DTYPE)
                moments = cls(torch.full_like(mean, count), mean, m2)
        if groups is None:
            return moments
        shape = (groups, -1)
        return cls(moments.count.view(shape), moments.mean.view(shape), moments.m2.view(shape))

    # ----------------------------------------------------------------- read-out
    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def var(self, unbiased: bool = False) -> Tensor:
        """Biased (``m2 / n``) or unbiased (``m2 / (n - 1)``) variance; NaN where undefined."""
        denom = self.count - 1 if unbiased else self.count
        return self.m2 / denom.where(denom > 0, torch.full_like(denom, float("nan")))

    def to(self, device: torch.device | str) -> Moments:
        return Moments(self.count.to(device), self.mean.to(device), self.m2.to(device))

    # ----------------------------------------------------------------- merging
    def merge(self, other: Moments) -> Moments:
        """The exact moments of the union of both sets of values (Chan et al.)."""
        n = self.count + other.count
        safe_n = n.clamp_min(1)
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / safe_n)
        m2 = self.m2 + other.m2 + delta.square() * (self.count * other.count / safe_n)
        return Moments(n, mean, m2)

    def segment_merge(self, index: Tensor, num_segments: int) -> Moments:
        """Merge the rows of ``self`` (shape ``(R, ...)``) into ``num_segments`` rows by ``index``.

        Row ``r`` goes to segment ``index[r]``; the result has shape ``(num_segments, ...)``. This
        is the vectorized form of merging many sets at once::

            n_s    = sum_{r in s} n_r
            mean_s = sum_{r in s} n_r * mean_r / n_s
            m2_s   = sum_{r in s} (m2_r + n_r * (mean_r - mean_s)^2)
        """
        index = index.to(self.mean.device)
        out_shape = (num_segments, *self.mean.shape[1:])
        count = self.count.new_zeros(out_shape).index_add_(0, index, self.count)
        safe = count.clamp_min(1)
        mean = self.mean.new_zeros(out_shape).index_add_(0, index, self.count * self.mean) / safe
        dev = self.m2 + self.count * (self.mean - mean[index]).square()
        m2 = self.m2.new_zeros(out_shape).index_add_(0, index, dev)
        return Moments(count, mean, m2)

    def total(self) -> Moments:
        """Merge all rows (leading dim) into one set of moments of shape ``(...)``."""
        index = torch.zeros(self.mean.shape[0], dtype=torch.long, device=self.mean.device)
        merged = self.segment_merge(index, 1)
        return Moments(merged.count[0], merged.mean[0], merged.m2[0])

    # ----------------------------------------------------------------- distributed
    def all_reduce(self, group: dist.ProcessGroup | None = None) -> Moments:
        """The moments of the union over every rank of ``group``, in one all_reduce."""
        return all_reduce_moments([self], group)[0]


def _pack(moments: Sequence[Moments]) -> Tensor:
    # Sums that are additive across ranks: n, n * mean, m2 + n * mean^2 (float64).
    parts = []
    for m in moments:
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


def all_reduce_moments(
    moments: Sequence[Moments], group: dist.ProcessGroup | None = None
) -> list[Moments]:
    """Merge every rank's moments, for any number of layers, with ONE all_reduce.

    Each set is packed as the additive sums ``(n, n * mean, m2 + n * mean^2)`` in float64, summed
    across ranks, and unpacked as ``mean = S1 / n``, ``m2 = S2 - n * mean^2``. Without an
    initialized process group (or with world size 1) the moments are returned unchanged.
    """
    moments = list(moments)
    if not moments or not dist.is_available() or not dist.is_initialized():
        return moments
    if dist.get_world_size(group) == 1:
        return moments
    flat = _pack(moments)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return _unpack(flat, moments)


def all_gather_moments(
    moments: Sequence[Moments], group: dist.ProcessGroup | None = None
) -> list[Moments]:
    """Merge every rank's moments exactly, for any number of layers, with ONE all_gather.

    Each rank contributes its ``(n, mean, m2)`` as they are; every rank then merges the
    ``world_size`` rows of each set with :meth:`Moments.total` (Chan's formula), in the same order
    on every rank, so all ranks end with bit-identical moments and no sum of squares can cancel.
    Without an initialized process group (or with world size 1) the moments are returned
    unchanged.
    """
    moments = list(moments)
    if not moments or not dist.is_available() or not dist.is_initialized():
        return moments
    world = dist.get_world_size(group)
    if world == 1:
        return moments
    flat = torch.cat([t.reshape(-1) for m in moments for t in (m.count, m.mean, m.m2)])
    rows = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(rows, flat, group=group)
    gathered = torch.stack(rows)  # (world, total)
    out, offset = [], 0
    for m in moments:
        k = m.mean.numel()
        parts = [gathered[:, offset + i * k: offset + (i + 1) * k].reshape(world, *m.shape)
                 for i in range(3)]
        offset += 3 * k
        out.append(Moments(*parts).total())
    return out
