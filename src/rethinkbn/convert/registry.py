"""The registries of ``rethinkbn.convert``: kinds, readers, source converters, norm-act variants.

The bottom of the conversions (it imports only :mod:`.state` and the layers): the factories
(:mod:`.kinds`, :mod:`.norm_act`) fill these tables through ``register_converter`` and
``register_norm_act``, and the engines (:mod:`.surgery`, :mod:`.fold`) look things up here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import BatchNormBase
from .state import BatchNormState, read_family, read_torch

__all__ = [
    "ACT_VARIANTS",
    "DEFAULT_TORCH_CLASS",
    "KINDS",
    "NORM_ACT_CLASSES",
    "READERS",
    "SOURCE_CONVERTERS",
    "TORCH_CLASSES",
    "Kind",
    "NormActMixin",
    "act_variant",
    "plain_class",
    "reader",
]

TORCH_CLASSES: tuple[type[_BatchNorm], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)
# A layer whose torch class is unknown (built directly as a rethinkbn layer) reverts to the one
# torch class that accepts every input rank; without an initialized process group it computes
# exactly what BatchNorm1d/2d/3d compute.
DEFAULT_TORCH_CLASS: type[_BatchNorm] = nn.SyncBatchNorm

Builder = Callable[..., nn.Module]
SourceConverter = Callable[..., nn.Module]
Reader = Callable[[nn.Module, str, int | None], BatchNormState]


@dataclass(frozen=True)
class Kind:
    """A conversion target: its name, its class and how a state is built into it."""

    name: str
    cls: type[nn.Module]
    build: Builder


# kind name -> Kind (register_converter(kind, Target))
KINDS: dict[str, Kind] = {}
# exact class -> how to read its layers into a BatchNormState
READERS: dict[type[nn.Module], Reader] = {cls: read_torch for cls in TORCH_CLASSES}
# (exact source class, kind name or "*") -> fn(module, **layer_kwargs) (register_converter(source=))
SOURCE_CONVERTERS: dict[tuple[type[nn.Module], str], SourceConverter] = {}
# torch's plain class -> the library class that adds drop + act to it (timm's, once registered)
ACT_VARIANTS: dict[type[nn.Module], type[_BatchNorm]] = {}
# rethinkbn kind class -> its norm-act class (norm_act.norm_act_class)
NORM_ACT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


class NormActMixin:
    """``act(drop(norm(x)))``: the forward timm's BatchNormAct2d adds to BatchNorm."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        y = super().forward(x, *args, **kwargs)  # type: ignore[misc]
        return self.act(self.drop(y))  # type: ignore[attr-defined]


def reader(cls: type[nn.Module]) -> Reader | None:
    """How to read a layer of exactly ``cls`` into a state; None for a type no kind knows."""
    found = READERS.get(cls)
    if found is None and issubclass(cls, NormActMixin) and issubclass(cls, BatchNormBase):
        found = read_family  # a norm-act class made for a kind (rethinkbn.convert.norm_act)
    return found


def act_variant(cls: type[nn.Module]) -> type[_BatchNorm] | None:
    """``cls`` when it is a registered norm-act torch class, else its norm-act counterpart
    (``nn.SyncBatchNorm`` -> timm's ``SyncBatchNormAct``), else None."""
    if cls in ACT_VARIANTS.values():
        return cls  # type: ignore[return-value]
    return ACT_VARIANTS.get(cls)


def plain_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The kind class a norm-act class was made from (``GhostBatchNormAct`` -> ``GhostBatchNorm``);
    any other class is its own."""
    for base, made in NORM_ACT_CLASSES.items():
        if made is cls:
            return base
    return cls
