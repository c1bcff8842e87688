"""Virtual devices: per-GPU BatchNorm, SyncBN and shuffled BN compared in one process.

A batch of ``N`` samples on ``k`` virtual devices is ``k`` contiguous chunks of ``N / k`` samples,
chunk ``d`` being device ``d``'s local batch (what a DistributedSampler gives rank ``d``). Then:

* per-GPU BN: ``virtual_devices(model, k)`` turns every BatchNorm into :class:`PerDeviceBatchNorm`,
  which normalizes each chunk with its own statistics (ghost BN with contiguous groups);
* SyncBN over the ``k`` devices: the model's plain BatchNorm over the whole batch;
* shuffled BN: ``ShuffledModule(virtual_devices(head, k), num_devices=k)`` permutes the
  samples across the chunks before the head and puts them back after, with the same permutation
  that :class:`~rethinkbn.distributed.ShufflePlan` makes across ``k`` real ranks.

``revert_batchnorm`` (or ``convert_batchnorm(model, "torch")``) turns the layers back.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .._checks import check_positive_int
from ..convert import convert_batchnorm
from ..layers import GhostBatchNorm, layer_name

__all__ = ["PerDeviceBatchNorm", "virtual_devices"]


class PerDeviceBatchNorm(GhostBatchNorm):
    """BatchNorm of a batch spread over ``num_devices`` virtual devices, each normalized alone.

    In training, a batch of ``N`` samples (``N`` a multiple of ``num_devices``) is split into
    ``num_devices`` contiguous chunks and each is normalized with its own statistics: a
    :class:`~rethinkbn.layers.GhostBatchNorm` grouping by ``N / num_devices`` samples in that
    forward (its own ``norm_batch_size`` attribute is left as it was). The running statistics
    are updated with the average of the devices' statistics (a real DDP job with
    ``broadcast_buffers`` keeps rank 0's alone: the same quantity, with more noise). Eval
    normalizes with the running statistics.

    ``num_devices`` is a plain attribute: ``None`` turns the device split off, and the layer then
    groups by its ``norm_batch_size`` like any GhostBatchNorm (``precise_bn`` and
    ``batch_stats_inference`` do this while they choose the normalization batch).
    """

    def __init__(self, num_features: int, num_devices: int = 1, **kwargs: object) -> None:
        check_positive_int(num_devices, "num_devices", f"PerDeviceBatchNorm({num_features})")
        kwargs.setdefault("grouping", "contiguous")
        if kwargs["grouping"] != "contiguous":
            raise ValueError(
                f"PerDeviceBatchNorm({num_features}): devices are contiguous chunks, "
                f"got grouping={kwargs['grouping']!r}"
            )
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        self.num_devices = num_devices

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_devices={self.num_devices}"

    def forward(self, x: Tensor) -> Tensor:
        """In training, each of the ``num_devices`` contiguous chunks of the batch normalized
        with its own statistics (``ValueError`` naming the layer when the batch does not split
        into equal chunks); in eval mode, or without devices, GhostBatchNorm's forward."""
        split = self.num_devices is not None and self.training
        if not (split and isinstance(x, Tensor) and x.dim() >= 1):
            return super().forward(x)
        if x.size(0) % self.num_devices:
            raise ValueError(
                f"{layer_name(self)}: a batch of {x.size(0)} samples does not split into "
                f"{self.num_devices} equal virtual devices; expected a multiple of "
                f"{self.num_devices}"
            )
        # The device split holds for this call only: norm_batch_size stays the user's (it is
        # what the layer groups by with num_devices=None).
        before = self.norm_batch_size
        self.norm_batch_size = max(x.size(0) // self.num_devices, 1)
        try:
            return super().forward(x)
        finally:
            self.norm_batch_size = before


def virtual_devices(model: nn.Module, num_devices: int, **kwargs: Any) -> nn.Module:
    """Make every BatchNorm of ``model`` per-device BN over ``num_devices`` virtual devices.

    ``convert_batchnorm(model, "per_device", num_devices=num_devices, **kwargs)``: the layers
    become :class:`PerDeviceBatchNorm` holding the same Parameter and buffer objects; selection
    keywords (``include``, ``exclude``, ``predicate``) are those of ``convert_batchnorm``. Changes
    ``model`` in place and returns it (the new root if the root itself was a BatchNorm).
    """
    check_positive_int(num_devices, "num_devices", "virtual_devices")
    return convert_batchnorm(model, "per_device", num_devices=num_devices, **kwargs)

