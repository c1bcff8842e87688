"""The package's kernel about models: one definition of each thing every tool needs.

Like ``_checks`` it imports nothing from the package, so every layer of it (layers, conversions,
population passes, diagnosis, integrations) can use it without an arrow up:

- **Layers.** What a BatchNorm layer is (:func:`is_batchnorm`; rethinkbn's own layers are
  recognized by :class:`BatchNormFamily`, which :class:`rethinkbn.layers.BatchNormBase`
  subclasses, so that this module needs no import of the layers), every BatchNorm layer of a
  model by qualified name (:func:`batchnorm_layers`), a layer's running statistics
  (:func:`running_buffers`).
- **Wrappers.** The user's model inside DDP / DataParallel / ``torch.compile`` (:func:`unwrap`).
- **Restoring.** :class:`ModelGuard` records every temporary change and puts it back.
- **Ranks.** :func:`world_size` and :func:`rank`, 1 and 0 outside torch.distributed.
- **Batches.** The one batch convention of every pass over data (:func:`select_input`,
  :func:`num_samples`, :func:`to_device`, :class:`FirstCall`), stated below.

The batch convention. A *batch* is what the data yields; the *model input* is what the default
forward calls the model with, ``model(select_input(batch, input_key))``:

================================  ===============================  ===========================
batch                             model input                      samples (:func:`num_samples`)
================================  ===============================  ===========================
a tensor ``(N, ...)``             the tensor                       ``N``
a tuple or list ``(x, y, ...)``   ``x`` (a namedtuple: its first   dim 0 of ``x``
                                  field)
a mapping (dict, OrderedDict,     ``batch[input_key]``; without    dim 0 of that entry
defaultdict, any ``Mapping``)     ``input_key`` a TypeError
                                  listing the keys, a missing key
                                  a KeyError listing them
an empty tuple or list            ValueError (nothing to call the  unknown (see below)
                                  model with)
anything else (a dataclass, a     the batch itself                 unknown (see below)
graph batch, a string)
================================  ===============================  ===========================

Samples are dim 0 of the model input when it is a tensor of at least one dimension; otherwise
dim 0 of the first tensor of at least one dimension found depth first in the batch (tuple and
list items in order, mapping values in insertion order). A 0-d tensor (a scalar: a step, a
weight) is never a batch of samples and is skipped. A batch with no such tensor has an *unknown*
size (:func:`num_samples` raises TypeError); a pass then counts dim 0 of the input of the first
BatchNorm call of that batch's forward (:class:`FirstCall`), and raises TypeError if no layer saw
a tensor. ``input_key`` is ignored for batches that are not mappings.

:func:`to_device` moves every tensor of a batch made of tensors, tuples, lists, namedtuples and
mappings (every level, structure and types kept: a namedtuple stays that namedtuple, a
defaultdict keeps its default factory, an OrderedDict its order); any other object (a dataclass,
a graph batch) is returned as it is, for a ``forward=`` to move itself.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

__all__ = [
    "STAT_BUFFERS",
    "BatchNormFamily",
    "FirstCall",
    "ModelGuard",
    "ROOT_NAME",
    "batchnorm_layers",
    "is_batchnorm",
    "num_samples",
    "rank",
    "running_buffers",
    "select_input",
    "to_device",
    "unwrap",
    "world_size",
]

STAT_BUFFERS = ("running_mean", "running_var")
ROOT_NAME = "<model>"
"""How reports and errors name a model that is itself a BatchNorm layer (its name is ``""``)."""
_MISSING = object()


# ---------------------------------------------------------------------------- layers
class BatchNormFamily:
    """Marks rethinkbn's BatchNorm layers (the base of :class:`rethinkbn.layers.BatchNormBase`)."""

    __slots__ = ()


def is_batchnorm(module: nn.Module) -> bool:
    """True for torch's BatchNorm layers (``_BatchNorm`` subclasses, SyncBatchNorm included) and
    for every layer of rethinkbn's family (:class:`BatchNormBase` subclasses)."""
    return isinstance(module, (_BatchNorm, BatchNormFamily))


def batchnorm_layers(
    model: nn.Module, *, root: str = "", also: tuple[type[nn.Module], ...] = ()
) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` for every BatchNorm layer of ``model``, in module order.

    The names are ``model.named_modules()``'s: a layer registered under several names appears
    once, under its first name; the root itself is named ``root`` (``""`` as in torch; reports
    pass :data:`ROOT_NAME`). ``also``: modules of exactly these types count as BatchNorm layers
    too (types a registered converter reads).
    """
    return [
        (name or root, module)
        for name, module in model.named_modules()
        if is_batchnorm(module) or type(module) in also
    ]


def running_buffers(layer: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The layer's ``(running_mean, running_var)``, or None when it keeps no running statistics."""
    mean = getattr(layer, "running_mean", None)
    var = getattr(layer, "running_var", None)
    if isinstance(mean, Tensor) and isinstance(var, Tensor):
        return mean, var
    return None


# ---------------------------------------------------------------------------- wrappers
def unwrap(model: nn.Module) -> nn.Module:
    """The model inside (Distributed)DataParallel and ``torch.compile`` wrappers, at any depth.

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


# ---------------------------------------------------------------------------- restoring
class ModelGuard:
    """Records what a temporary change touches and puts it back, bit for bit, on :meth:`restore`.

    Training flags of every module are recorded on construction. Attributes, buffer values and
    ``_buffers`` slots are recorded by the methods that change them; hooks registered through
    :meth:`hook` are removed. Restoring runs in reverse order of the changes, and may be called
    more than once (a second call only resets the training flags again)::

        guard = ModelGuard(model)
        try:
            guard.set_attr(layer, "momentum", 1.0)
            guard.hook(layer.register_forward_hook(fn))
            ...
        finally:
            guard.restore()
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
        """``module._buffers[name] = value`` (the slot, not the values), undone on restore."""
        self._undo.append(("slot", module, name, module._buffers[name]))
        module._buffers[name] = value

    def hook(self, handle: RemovableHandle) -> None:
        """Remove ``handle`` (a hook registered for the change) on restore."""
        self._undo.append(("hook", handle))

    def restore(self) -> None:
        """Undo every recorded change, newest first, then put back every training flag."""
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


# ---------------------------------------------------------------------------- ranks
def world_size(process_group: dist.ProcessGroup | None = None) -> int:
    """The group's size (None: the world) when torch.distributed is initialized, else 1."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(process_group)


def rank(process_group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in the group (None: the world) when initialized, else 0."""
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(process_group)


# ---------------------------------------------------------------------------- batches
def select_input(batch: Any, input_key: Any = None) -> Any:
    """The model input of a batch (see the module docstring's table).

    Raises:
        TypeError: a mapping batch without ``input_key`` (the message lists its keys).
        KeyError: a mapping batch without the entry ``input_key`` (listing its keys).
        ValueError: an empty tuple or list.
    """
    if isinstance(batch, Mapping):
        keys = sorted(map(str, batch))
        if input_key is None:
            raise TypeError(
                f"the batch is a mapping with keys {keys}; pass input_key= to say which one is "
                "the model input, or forward= to call the model yourself"
            )
        if input_key not in batch:
            raise KeyError(f"input_key={input_key!r} is not a key of the batch; its keys: {keys}")
        return batch[input_key]
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(
                f"got an empty {type(batch).__name__} as a batch; expected (input, ...)"
            )
        return batch[0]
    return batch


def first_tensor(batch: Any) -> Tensor | None:
    """The first tensor of at least one dimension in ``batch``, depth first (tuple and list
    items in order, mapping values in insertion order); None when there is none."""
    if isinstance(batch, Tensor):
        return batch if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for item in batch:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def num_samples(batch: Any, input_key: Any = None) -> int:
    """The number of samples in a batch: dim 0 of its model input, or of its first tensor.

    Raises:
        TypeError: the size is unknown (no tensor of at least one dimension in the batch); a
            pass then counts the batch where its BatchNorm layers see it (:class:`FirstCall`).
        KeyError: as :func:`select_input`, a mapping batch without the entry ``input_key``.
    """
    try:
        x = select_input(batch, input_key)
    except (TypeError, ValueError):
        x = None
    if not (isinstance(x, Tensor) and x.dim() > 0):
        x = first_tensor(batch)
    if x is None:
        raise TypeError(
            f"cannot tell the batch size of a batch of type {type(batch).__name__}; expected a "
            "tensor (N, ...) or a tuple/list/dict holding one"
        )
    return int(x.size(0))


def to_device(batch: Any, device: torch.device | str | None) -> Any:
    """``batch`` with every tensor moved to ``device`` (None: the batch itself, not copied).

    Tensors inside tuples, lists, namedtuples and mappings move, at every level; the containers
    are rebuilt with their own types (a dict subclass is copied with ``copy.copy`` and then
    refilled, so a defaultdict keeps its factory); any other object is returned as it is.
    """
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    if isinstance(batch, dict):
        moved = copy.copy(batch)
        for key, value in batch.items():
            moved[key] = to_device(value, device)
        return moved
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    return batch


@dataclass
class FirstCall:
    """Dim 0 of the input of the first BatchNorm call of one forward (None: no call yet).

    How a pass counts the samples of a batch whose size is unknown (an object given with
    ``forward=``: a dataclass, a graph batch): where the BatchNorm layers see them. Register
    :meth:`hook` as a forward pre-hook on every layer, set ``samples = None`` before each forward.
    """

    samples: int | None = None

    def hook(self, _layer: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook: remember dim 0 of the first tensor input (of 1+ dims) seen."""
        x = args[0] if args else None
        if self.samples is None and isinstance(x, Tensor) and x.dim() > 0:
            self.samples = int(x.size(0))
