"""Finding BatchNorm layers and putting a model back exactly as it was.

Every function of :mod:`rethinkbn.population` that changes a model temporarily (modes, momenta,
observers, hooks, buffer values) records the old state in a :class:`ModelGuard` first and calls
:meth:`ModelGuard.restore` in ``finally``, so an exception, a ``KeyboardInterrupt`` or bad
statistics leave the model as it was.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..layers import FrozenBatchNorm, is_batchnorm
from ..layers.base import layer_name
from ..layers.functional import require_two_values

__all__ = [
    "ModelGuard",
    "check_model_first",
    "syncs_across_ranks",
    "use_local_batch_stats",
    "skip_empty_calls",
    "name_torch_errors",
    "batchnorm_layers",
    "is_frozen",
    "running_buffers",
    "unwrap",
]

_MISSING = object()
STAT_BUFFERS = ("running_mean", "running_var")


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` is a FrozenBatchNorm (normalizes with fixed statistics in every mode)."""
    return isinstance(module, FrozenBatchNorm)


def check_model_first(model: object, data: object, caller: str) -> None:
    """Raise TypeError unless ``model`` is an ``nn.Module``: ``caller(model, data)`` takes the
    model first (torch's ``update_bn(loader, model)`` has the other order), said in the error."""
    if isinstance(model, nn.Module):
        return
    swapped = isinstance(data, nn.Module)
    raise TypeError(
        f"{caller}: expected the model (an nn.Module) as the first argument, got "
        f"{type(model).__name__}"
        + ("; the arguments are swapped: call "
           f"{caller}(model, data) (torch's update_bn takes (loader, model))" if swapped else "")
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside (Distributed)DataParallel and ``torch.compile`` wrappers.

    Buffers are shared, not copied; layer names are those of the user's model (no ``module.`` or
    ``_orig_mod.`` prefix). A pass over an unwrapped compiled model runs eagerly.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.parallel.DataParallel)):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is the wrapper that ``torch.compile(module)`` returns."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return isinstance(model, OptimizedModule)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` for every BatchNorm layer of ``model``, in module order.

    A layer registered under several names appears once, under its first name.
    """
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        if is_batchnorm(module) and id(module) not in seen:
            seen.add(id(module))
            out.append((name or "<model>", module))
    return out


def running_buffers(layer: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The layer's ``(running_mean, running_var)``, or None when it keeps no running statistics."""
    mean = getattr(layer, "running_mean", None)
    var = getattr(layer, "running_var", None)
    if isinstance(mean, Tensor) and isinstance(var, Tensor):
        return mean, var
    return None


def syncs_across_ranks(layer: nn.Module) -> bool:
    """Whether the layer's training forward would merge batch statistics across ranks.

    Duck-typed on ``process_group`` (torch's and rethinkbn's SyncBatchNorm), since this layer of
    the package may not import the distributed one.
    """
    if not hasattr(layer, "process_group") or not dist.is_available():
        return False
    if not dist.is_initialized():
        return False
    return dist.get_world_size(layer.process_group or dist.group.WORLD) > 1


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


class ModelGuard:
    """Records what a temporary change touches and puts it back, bit for bit, on :meth:`restore`.

    Training flags of every module are recorded on construction. Attributes, buffer values and
    ``_buffers`` slots are recorded by the methods that change them; hooks registered through
    :meth:`hook` are removed. Restoring runs in reverse order of the changes.
    """

    def __init__(self, model: nn.Module) -> None:
        self._flags = [(m, m.training) for m in model.modules()]
        self._undo: list[Any] = []

    def set_attr(self, module: nn.Module, name: str, value: Any) -> None:
        """``setattr(module, name, value)``, undone on restore (deleted if it did not exist)."""
        self._undo.append(("attr", module, name, getattr(module, name, _MISSING)))
        setattr(module, name, value)

    def keep_values(self, tensors: list[Tensor]) -> None:
        """Remember the values of ``tensors`` to copy them back in place (same tensor objects)."""
        self._undo.append(("values", [(t, t.detach().clone()) for t in tensors]))

    def set_buffer_slot(self, module: nn.Module, name: str, value: Tensor | None) -> None:
        self._undo.append(("slot", module, name, module._buffers[name]))
        module._buffers[name] = value

    def hook(self, handle: RemovableHandle) -> None:
        self._undo.append(("hook", handle))

    def restore(self) -> None:
        with torch.no_grad():
            for entry in reversed(self._undo):
                kind = entry[0]
                if kind == "attr":
                    _, module, name, old = entry
                    if old is _MISSING:
                        delattr(module, name)
                    else:
                        setattr(module, name, old)
                elif kind == "values":
                    for live, saved in entry[1]:
                        live.copy_(saved)
                elif kind == "slot":
                    _, module, name, old = entry
                    module._buffers[name] = old
                else:
                    entry[1].remove()
        self._undo.clear()
        for module, flag in self._flags:
            module.training = flag
