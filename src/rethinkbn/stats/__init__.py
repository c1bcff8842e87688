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

from .collectives import all_gather_moments, all_reduce_moments, check_same_layout, require
from .moments import (
    ACC_DTYPE as ACC_DTYPE,  # the accumulators' dtype, for modules that build moments
)
from .moments import (
    Moments,
    centered,
    channel_view,
    compute_dtype,
    reduce_dims,
    segment_var_mean,
    split_mean,
)

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
