"""Frozen BatchNorm: normalize with fixed population statistics in training and in eval."""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import Moments
from . import functional as BF
from .base import BatchNormBase, layer_name

__all__ = ["FrozenBatchNorm"]


class FrozenBatchNorm(BatchNormBase):
    """BatchNorm that always normalizes with its running (population) statistics.

    The paper's FrozenBN: training uses the population statistics instead of batch statistics,
    so the running buffers never change, while the affine ``weight`` and ``bias`` keep learning
    (unless ``affine_trainable=False``, which sets their ``requires_grad`` to False; they stay
    parameters so that ``state_dict`` keys equal torch's). ``eps`` and ``momentum`` are kept so
    that converting back to a torch BatchNorm restores the original layer exactly.

    ``y = x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale``, computed in float32 (no inf/NaN when a float16
    variance underflows) and applied as one fused multiply-add.

    Without running statistics (``track_running_stats=False``) there is nothing to freeze: the
    layer then normalizes with batch statistics, exactly like torch's BatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        affine_trainable: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(affine_trainable, bool):
            raise TypeError(
                f"FrozenBatchNorm: affine_trainable must be a bool, got {affine_trainable!r}"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.affine_trainable = affine_trainable
        if affine and not affine_trainable:
            self.weight.requires_grad_(False)
            self.bias.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, affine_trainable={self.affine_trainable}"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.running_mean is not None:
            assert self.running_var is not None
            return BF.affine_normalize(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        # Without running statistics eval normalizes with batch statistics too.
        values = x.numel() // x.size(1)
        BF.require_two_values(values, x, lambda: layer_name(self))
        y, mean, var = BF.native_batch_norm(x, self.weight, self.bias, self.eps)
        if self.observer is not None:
            self._observe(Moments.from_var_mean(values, mean, var, unbiased=True))
        return y
