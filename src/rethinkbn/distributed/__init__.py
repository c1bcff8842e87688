"""Distributed BatchNorm: SyncBatchNorm, shuffling across devices, virtual devices.

    model = to_sync_bn(model)                      # every BatchNorm -> SyncBatchNorm (world)
    model = to_sync_bn(model, group_size=4)        # sync within consecutive groups of 4 ranks
    head = ShuffledModule(head)                    # MoCo / Fig. 9 shuffle BN across ranks
    head = ShuffledModule(virtual_devices(head, 8), num_devices=8)   # the same, one process

Importing this package registers the conversion kinds ``"sync"`` (:class:`SyncBatchNorm`) and
``"per_device"`` (:class:`PerDeviceBatchNorm`) with :func:`rethinkbn.convert.register_converter`,
so ``convert_batchnorm(model, "sync")`` and ``revert_batchnorm(model)`` (back to the torch class
each layer came from: BatchNorm1d/2d/3d or torch's SyncBatchNorm) work.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from ..convert import convert_batchnorm, register_converter
from .shuffle import ShuffledModule, ShufflePlan, shuffle_permutation
from .sync import SyncBatchNorm, consecutive_group
from .virtual import PerDeviceBatchNorm, virtual_devices

__all__ = [
    "PerDeviceBatchNorm",
    "ShufflePlan",
    "ShuffledModule",
    "SyncBatchNorm",
    "consecutive_group",
    "shuffle_permutation",
    "to_sync_bn",
    "virtual_devices",
]

register_converter("sync", SyncBatchNorm)
register_converter("per_device", PerDeviceBatchNorm)


def to_sync_bn(
    model: nn.Module,
    process_group: dist.ProcessGroup | None = None,
    group_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Replace every BatchNorm of ``model`` by :class:`SyncBatchNorm`; returns the model.

    ``convert_batchnorm(model, "sync", ...)``: the new layers hold the same Parameter and buffer
    objects (an optimizer built before keeps working), eps, momentum, modes and provenance, and
    :func:`rethinkbn.convert.revert_batchnorm` turns them back. ``process_group`` (default: the
    world) or ``group_size`` (consecutive groups of that many ranks) choose the ranks normalized
    together; the groups of ``group_size`` are created once per world (:func:`consecutive_group`;
    a collective, so every rank converts). Other keywords (``include``, ``exclude``,
    ``predicate``) select the layers. Changes ``model`` in place.
    """
    layer_kwargs: dict[str, Any] = dict(kwargs)
    if process_group is not None:
        layer_kwargs["process_group"] = process_group
    if group_size is not None:
        layer_kwargs["group_size"] = group_size
    return convert_batchnorm(model, "sync", **layer_kwargs)
