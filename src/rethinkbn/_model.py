"""What a BatchNorm layer is, and every BatchNorm layer of a model by qualified name.

The package's kernel about models (like ``_checks``, it imports nothing from the package): the
layers, the conversions, the population passes and the diagnosis all find BatchNorm layers here,
so "a BatchNorm layer" means the same thing everywhere. rethinkbn's own layers are recognized by
:class:`BatchNormFamily`, which :class:`rethinkbn.layers.BatchNormBase` subclasses, so that this
module needs no import of the layers.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BatchNormFamily", "batchnorm_layers", "is_batchnorm"]


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
    say ``"<model>"``). ``also``: modules of exactly these types count as BatchNorm layers too
    (types a registered converter reads).
    """
    return [
        (name or root, module)
        for name, module in model.named_modules()
        if is_batchnorm(module) or type(module) in also
    ]
