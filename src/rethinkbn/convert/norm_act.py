"""BatchNorm fused with dropout and an activation (timm's ``BatchNormAct2d``), for every kind.

timm builds most models from ``BatchNormAct2d`` / ``SyncBatchNormAct``: a torch BatchNorm whose
forward goes on with ``self.drop`` and then ``self.act`` (children of the layer, so their
``state_dict`` keys sit under the layer's). Converting such a layer gives the requested kind's
class with the same two children, :func:`norm_act_class` ``(GhostBatchNorm)`` =
``GhostBatchNormAct``: a subclass (``isinstance(m, GhostBatchNorm)`` holds, every population tool
sees it) whose forward is ``act(drop(GhostBatchNorm.forward(x)))``. The ``state_dict`` keys are
timm's, and the very ``drop`` and ``act`` objects move between the layers.

timm is never imported here: a model that holds timm layers has imported timm already, so
:func:`register_known_libraries` (called by every conversion and by ``fold_batchnorm``) only looks
for ``timm.layers.norm_act`` in ``sys.modules``. Importing timm ourselves would cost a second and
pull in torchvision, which does not load with every torch build.
"""

from __future__ import annotations

import sys
from typing import TypeVar, cast

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .registry import (
    ACT_VARIANTS,
    KINDS,
    NORM_ACT_CLASSES,
    READERS,
    NormActMixin,
    act_variant,
    plain_class,
)
from .state import POST_MODULES, post_modules, read_torch

__all__ = [
    "POST_MODULES",
    "NormActMixin",
    "act_variant",
    "norm_act_class",
    "plain_class",
    "post_modules",
    "register_known_libraries",
    "register_norm_act",
]

M = TypeVar("M", bound=nn.Module)


def norm_act_class(base: type[M]) -> type[M]:
    """The subclass of ``base`` (a rethinkbn layer class) that applies ``drop`` then ``act``.

    One class per base, created on first use and published in this module as
    ``<base name>Act`` so that ``torch.save(model)`` pickles it by name.
    """
    if issubclass(base, NormActMixin):
        return base
    cls = NORM_ACT_CLASSES.get(base)
    if cls is None:
        name = f"{base.__name__}Act"
        cls = type(name, (NormActMixin, base), {"__module__": __name__, "__qualname__": name,
                                                 "__doc__": f"{base.__name__} + drop + act."})
        NORM_ACT_CLASSES[base] = cls
        globals().setdefault(name, cls)
    return cast("type[M]", cls)  # a subclass of base (NORM_ACT_CLASSES[base] always is)


def __getattr__(name: str) -> type[nn.Module]:
    # Unpickling a saved model asks for a class this process has not created yet.
    if name.startswith("__") or not name.endswith("Act"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for kind in KINDS.values():
        if name == f"{kind.cls.__name__}Act" and not issubclass(kind.cls, _BatchNorm):
            return norm_act_class(kind.cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_norm_act(plain: type[_BatchNorm], norm_act: type[_BatchNorm]) -> None:
    """Teach every conversion a library's norm-act class.

    ``norm_act`` subclasses torch's ``plain`` (``nn.BatchNorm2d``, ``nn.SyncBatchNorm``), takes
    ``plain``'s constructor keywords, and its forward is ``act(drop(plain.forward(x)))`` with
    ``drop`` and ``act`` children (timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` are
    registered this way when timm is imported). Conversions then read it as ``plain`` plus
    ``drop`` and ``act``, a revert to ``plain`` gives ``norm_act`` back, and ``fold_batchnorm``
    folds it. Side effect: changes the module-level registry.
    """
    if not (isinstance(norm_act, type) and issubclass(norm_act, plain)):
        raise TypeError(
            f"register_norm_act: expected a subclass of {plain.__name__}, got {norm_act!r}"
        )
    ACT_VARIANTS[plain] = norm_act
    READERS[norm_act] = read_torch


_TIMM_CLASSES = {nn.BatchNorm2d: "BatchNormAct2d", nn.SyncBatchNorm: "SyncBatchNormAct"}


def register_known_libraries() -> None:
    """Register timm's norm-act layers when timm is already imported (never imports it).

    timm's FrozenBatchNormAct2d holds its weight and bias as buffers (it is no _BatchNorm): it is
    not read; rethinkbn's ``freeze_bn`` gives the frozen norm-act layer instead.
    """
    timm_norm_act = sys.modules.get("timm.layers.norm_act")
    if timm_norm_act is None:
        return
    for plain, name in _TIMM_CLASSES.items():
        cls = getattr(timm_norm_act, name, None)
        if isinstance(cls, type) and cls not in ACT_VARIANTS.values():
            register_norm_act(plain, cls)
