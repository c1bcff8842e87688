"""Ghost BatchNorm: normalize groups of ``norm_batch_size`` samples with their own statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import Moments
from . import functional as BF
from .base import BatchNormBase, layer_name

__all__ = ["GhostBatchNorm"]


class GhostBatchNorm(BatchNormBase):
    """BatchNorm whose training statistics come from groups of ``norm_batch_size`` samples.

    The paper's *normalization batch size* (NBS): in training, the batch is split into groups and
    every group is normalized with its own mean and variance, all groups in one vectorized
    computation. This is what per-GPU BatchNorm does to a batch split across devices, on one
    device.

    * ``grouping="contiguous"`` (default): samples ``0..k-1``, ``k..2k-1``, ... form the groups;
      ``grouping="strided"``: sample ``i`` belongs to group ``i % G``.
    * A batch that ``k = norm_batch_size`` does not divide: the remainder ``r = N % k`` is a group
      of its own when ``r >= 2``; a single left-over sample joins the previous group (``k + 1``
      samples). With strided grouping the same number ``G`` of groups is used.
    * ``norm_batch_size=None`` (or ``>= N``) normalizes the whole batch: the layer is then exactly
      torch's BatchNorm.
    * Running statistics are updated once per step, with torch's momentum rule, from the
      *sample-weighted* average of the group statistics::

          mean_B = sum_g n_g * mean_g / N,    var_B = sum_g n_g * unbiased_var_g / N

      where ``n_g`` is the number of samples of group ``g``; for equal groups this is the plain
      average of the group statistics.
    * Eval uses the running statistics, never groups. Without running statistics
      (``track_running_stats=False``) eval normalizes the whole batch, as torch does.

    ``norm_batch_size`` and ``grouping`` are plain attributes and may be changed at any time.
    """

    def __init__(
        self,
        num_features: int,
        norm_batch_size: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        grouping: str = "contiguous",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        BF.check_norm_batch_size(norm_batch_size, "GhostBatchNorm")
        BF.check_grouping(grouping, "GhostBatchNorm")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.norm_batch_size = norm_batch_size
        self.grouping = grouping

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, norm_batch_size={self.norm_batch_size}, "
            f"grouping={self.grouping!r}"
        )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self._uses_batch_stats():
            assert self.running_mean is not None and self.running_var is not None
            return BF.affine_normalize(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        nbs = self.norm_batch_size if self.training else None
        BF.check_groups(x, nbs, self.grouping, lambda: layer_name(self))
        if nbs is None or nbs >= x.size(0):
            # The whole batch: torch's kernel and nothing else (no per-group bookkeeping).
            y, mean, var = BF.native_batch_norm(x, self.weight, self.bias, self.eps)
            if self._updates_running_stats():
                self._update_running_stats(mean, var)
            if self.observer is not None:
                self._observe(Moments.from_var_mean(x.numel() // x.size(1), mean, var,
                                                    unbiased=True))
            return y
        y, (mean, var, count) = BF.ghost_batch_norm(
            x, self.weight, self.bias, self.eps, nbs, self.grouping
        )
        if self._updates_running_stats():
            if count.numel() == 1:
                self._update_running_stats(mean[0], var[0])
            else:
                weights = count.to(device=mean.device, dtype=mean.dtype)[:, None]
                weights = weights / weights.sum()
                self._update_running_stats((mean * weights).sum(0), (var * weights).sum(0))
        if self.observer is not None:
            # The groups' statistics merge exactly into the batch's: no second pass over x.
            self._observe(Moments.from_var_mean(count[:, None], mean, var, unbiased=True).total())
        return y
