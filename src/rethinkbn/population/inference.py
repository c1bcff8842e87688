"""Mini-batch statistics at inference (the paper's Sec. 4.2).

Normalizing a test batch with its own statistics removes the train/test inconsistency of small
normalization batch sizes (Fig. 6) and, in detection heads, the domain shift between training
batches and a test image (Table 3).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._model import ROOT_NAME, ModelGuard, batchnorm_layers, unwrap
from ..layers import functional as BF
from ..layers.base import BatchNormBase, layer_name
from ._state import (
    is_frozen,
    name_torch_errors,
    skip_empty_calls,
    syncs_across_ranks,
    use_local_batch_stats,
    use_norm_batch_size,
)

__all__ = ["batch_stats_inference"]


def _check(model: nn.Module, norm_batch_size: int | None) -> list[tuple[str, nn.Module]]:
    BF.check_norm_batch_size(norm_batch_size, "batch_stats_inference")
    layers = [(n, m) for n, m in batchnorm_layers(model, root=ROOT_NAME) if not is_frozen(m)]
    if norm_batch_size is None:
        return layers
    for name, layer in layers:
        groupable = hasattr(layer, "norm_batch_size") or type(layer) in (
            nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
        )
        if not groupable or syncs_across_ranks(layer):
            raise ValueError(
                f"batch_stats_inference: layer '{name}' ({layer.__class__.__name__}) cannot "
                f"normalize in groups of norm_batch_size={norm_batch_size}; expected torch "
                "BatchNorm1d/2d/3d or GhostBatchNorm (or pass norm_batch_size=None)"
            )
    return layers


def _grouped_output(norm_batch_size: int) -> Any:
    def hook(layer: _BatchNorm, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        if args[0].size(0) == 0:
            return output  # an empty batch has no groups
        # torch's kernel saw the whole batch; a group with one value would silently give 0
        BF.check_groups(args[0], norm_batch_size, "contiguous", layer_name(layer))
        y, _ = BF.ghost_batch_norm(args[0], layer.weight, layer.bias, layer.eps, norm_batch_size)
        return y

    return hook


@contextmanager
def batch_stats_inference(
    model: nn.Module, norm_batch_size: int | None = None
) -> Iterator[nn.Module]:
    """Within the block, BatchNorm layers normalize each batch with that batch's statistics.

    Every other module is in eval mode (dropout off). With ``norm_batch_size=k`` each batch is
    normalized in contiguous groups of ``k`` samples, as GhostBatchNorm does in training (a
    remainder of one sample joins the previous group); for torch's BatchNorm this replaces the
    layer's output through a forward hook, at the price of a second normalization. The running
    buffers and
    ``num_batches_tracked`` are not touched; FrozenBatchNorm keeps its fixed statistics; a
    SyncBatchNorm normalizes each rank's batch alone. Yields the model.

    Side effects: modes, ``track_running_stats``, ``norm_batch_size``, the hooks and the layers'
    ``_rethinkbn_name`` (so that errors name them) change for the block only and are restored
    exactly on exit, also on an exception. A group with one value per channel raises, naming the
    layer. Layers that cannot
    group (DomainBatchNorm, SyncBatchNorm with ``norm_batch_size``) raise before anything changes.
    """
    model = unwrap(model)
    layers = _check(model, norm_batch_size)
    guard = ModelGuard(model)
    try:
        for module in model.modules():
            module.training = False
        for name, layer in layers:
            guard.set_attr(layer, "_rethinkbn_name", name)
            if not isinstance(layer, BatchNormBase):
                name_torch_errors(guard, layer)
            if syncs_across_ranks(layer):
                use_local_batch_stats(guard, layer)
                continue
            # training without tracking: batch statistics, and no running-buffer update
            guard.set_attr(layer, "track_running_stats", False)
            layer.training = True
            if isinstance(layer, BatchNormBase):
                use_norm_batch_size(guard, layer, norm_batch_size)
                skip_empty_calls(guard, layer)
            elif norm_batch_size is not None:
                # first of the layer's forward hooks: the user's own hooks then act on the
                # grouped output, as they would on GhostBatchNorm's
                guard.hook(layer.register_forward_hook(_grouped_output(norm_batch_size),
                                                       prepend=True))
        yield model
    finally:
        guard.restore()
