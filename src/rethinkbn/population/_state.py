"""The temporary changes a population pass makes to a model's BatchNorm layers.

Every function of :mod:`rethinkbn.population` that changes a model temporarily (modes, momenta,
observers, hooks, buffer values) records the old state in a :class:`~rethinkbn._model.ModelGuard`
(the package's kernel) first and calls its ``restore`` in ``finally``, so an exception, a
``KeyboardInterrupt`` or bad statistics leave the model as it was. The helpers here make those
changes through the guard.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from .._model import ROOT_NAME, ModelGuard, batchnorm_layers, running_buffers
from ..layers import FrozenBatchNorm
from ..layers.base import layer_name
from ..layers.functional import require_two_values

__all__ = [
    "check_model_first",
    "syncs_across_ranks",
    "use_local_batch_stats",
    "skip_empty_calls",
    "name_torch_errors",
    "is_frozen",
    "pass_layers",
    "stat_layers",
    "use_norm_batch_size",
]

logger = logging.getLogger(__name__)


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` is a FrozenBatchNorm (normalizes with fixed statistics in every mode)."""
    return isinstance(module, FrozenBatchNorm)


def check_model_first(model: object, data: object) -> None:
    """Raise TypeError unless ``model`` is an ``nn.Module``: the population functions take
    ``(model, data)`` (torch's ``update_bn(loader, model)`` has the other order), said in the
    error."""
    if isinstance(model, nn.Module):
        return
    swapped = isinstance(data, nn.Module)
    raise TypeError(
        f"expected the model (an nn.Module) as the first argument, got {type(model).__name__}"
        + ("; the arguments are swapped: call it as (model, data) (torch's update_bn takes "
           "(loader, model))" if swapped else "")
    )


def stat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers of ``model`` that keep running statistics, by qualified name (a model
    that is itself a layer is named ``"<model>"``): those a snapshot covers."""
    return [(name, layer) for name, layer in batchnorm_layers(model, root=ROOT_NAME)
            if running_buffers(layer) is not None]


def pass_layers(model: nn.Module, include_frozen: bool) -> list[tuple[str, nn.Module]]:
    """The layers a pass estimates: those with running statistics, FrozenBN only when asked."""
    out = []
    for name, layer in batchnorm_layers(model, root=ROOT_NAME):
        if running_buffers(layer) is None:
            logger.debug("skipping %s: it keeps no running statistics", name)
        elif is_frozen(layer) and not include_frozen:
            logger.debug("skipping %s: FrozenBatchNorm (pass include_frozen=True)", name)
        else:
            out.append((name, layer))
    return out


def syncs_across_ranks(layer: nn.Module) -> bool:
    """Whether the layer's training forward would merge batch statistics across ranks.

    Duck-typed on ``process_group`` (torch's and rethinkbn's SyncBatchNorm), since this layer of
    the package may not import the distributed one.
    """
    if not hasattr(layer, "process_group") or not dist.is_available():
        return False
    if not dist.is_initialized():
        return False
    group = layer.process_group
    return dist.get_world_size(group if isinstance(group, dist.ProcessGroup) else None) > 1


def use_local_batch_stats(guard: ModelGuard, layer: nn.Module) -> None:
    """Make a SyncBatchNorm normalize with its local batch statistics, without syncing.

    In eval mode without running buffers, both torch's and rethinkbn's SyncBatchNorm normalize
    each rank's batch alone and update nothing; the buffers are put back by ``guard``. An empty
    local batch has no statistics: for that call the buffers are put back (eval mode normalizes
    nothing with them and updates nothing).
    """
    saved = (layer._buffers["running_mean"], layer._buffers["running_var"])
    guard.set_buffer_slot(layer, "running_mean", None)
    guard.set_buffer_slot(layer, "running_var", None)
    layer.training = False

    def before(module: nn.Module, args: tuple[Any, ...]) -> None:
        if _is_empty(args):
            module._buffers["running_mean"], module._buffers["running_var"] = saved

    def after(module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
        module._buffers["running_mean"] = module._buffers["running_var"] = None

    guard.hook(layer.register_forward_pre_hook(before, prepend=True))
    guard.hook(layer.register_forward_hook(after, always_call=True))


def _is_empty(args: tuple[Any, ...]) -> bool:
    x = args[0] if args else None
    return isinstance(x, Tensor) and x.dim() > 0 and x.size(0) == 0


def skip_empty_calls(guard: ModelGuard, layer: nn.Module) -> None:
    """Make a rethinkbn layer normalize an empty input (N=0) in eval mode, for that call only.

    Batch statistics of zero values do not exist (the layer would raise), and an empty batch
    contributes nothing to a population: in eval mode the layer returns an empty output and
    observes nothing. The training flag is put back after the call (and by ``guard`` on an
    exception).
    """
    switched = False

    def before(module: nn.Module, args: tuple[Any, ...]) -> None:
        nonlocal switched
        if _is_empty(args) and module.training:
            module.training, switched = False, True

    def after(module: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
        nonlocal switched
        if switched:
            module.training, switched = True, False

    guard.hook(layer.register_forward_pre_hook(before, prepend=True))
    guard.hook(layer.register_forward_hook(after, always_call=True))


def name_torch_errors(guard: ModelGuard, layer: nn.Module) -> None:
    """Check, before torch's kernel does, that a batch-statistics call has 2+ values per channel.

    Torch's own error does not say which layer; this one names it (``_rethinkbn_name``). Empty
    inputs pass: torch returns an empty output for them.
    """

    def before(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() < 2 or x.size(0) == 0:
            return
        if module.training or getattr(module, "running_mean", None) is None:
            require_two_values(x.numel() // max(x.size(1), 1), x, layer_name(module))

    guard.hook(layer.register_forward_pre_hook(before))


def use_norm_batch_size(guard: ModelGuard, layer: nn.Module, norm_batch_size: int | None) -> None:
    """Make a grouping layer normalize in groups of ``norm_batch_size`` (None: the whole batch).

    Layers that derive their groups from a device count (``num_devices``, the virtual devices of
    ``rethinkbn.distributed``) get the count switched off, so the explicit size wins.
    """
    if hasattr(layer, "norm_batch_size"):
        guard.set_attr(layer, "norm_batch_size", norm_batch_size)
    if getattr(layer, "num_devices", None) is not None:
        guard.set_attr(layer, "num_devices", None)
