"""The conversion kinds: how a :class:`~.state.BatchNormState` is built into each target class.

The factories of ``rethinkbn.convert``, between the registry (:mod:`.registry`) and the engine
(:mod:`.surgery`): :func:`register_converter` and the builders of the kinds ``"torch"``,
``"ghost"``, ``"frozen"`` and ``"domain"`` (``"sync"`` and ``"per_device"`` register from
:mod:`rethinkbn.distributed`).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import BatchNormBase, DomainBatchNorm, FrozenBatchNorm, GhostBatchNorm
from .norm_act import norm_act_class
from .registry import (
    DEFAULT_TORCH_CLASS,
    KINDS,
    READERS,
    SOURCE_CONVERTERS,
    Builder,
    Kind,
    act_variant,
)
from .state import BatchNormState, read_family

__all__ = ["attach_post", "register_converter"]


def attach_post(layer: nn.Module, state: BatchNormState) -> nn.Module:
    """Give ``layer`` (just built from ``state``) the state's ``drop`` and ``act``; returns it.

    A rethinkbn layer becomes its kind's norm-act class; a torch class must already be a
    norm-act class (timm's). Raises ValueError where the activation would be lost.
    """
    if not state.post:
        return layer
    if isinstance(layer, BatchNormBase):
        layer.__class__ = norm_act_class(type(layer))
    elif act_variant(type(layer)) is not type(layer):
        raise ValueError(
            f"{type(layer).__name__} has no activation, so it would drop the layer's "
            f"{', '.join(f'{k}={type(m).__name__}' for k, m in state.post.items())}"
        )
    for key, module in state.post.items():
        layer.add_module(key, module)
    return layer


def _build_family(cls: type[nn.Module]) -> Builder:
    def build(state: BatchNormState, **layer_kwargs: Any) -> nn.Module:
        options = {**state.options(), **state.sync_options(cls, layer_kwargs), **layer_kwargs}
        return state.install(cls(state.num_features, **options))

    return build


def register_converter(
    to: str,
    target: type[nn.Module] | None = None,
    *,
    build: Builder | None = None,
    source: type[nn.Module] | None = None,
) -> None:
    """Teach :func:`convert_batchnorm` a new kind, or how to convert one more source type.

    Two forms:

    * ``register_converter(kind, TargetClass, build=None)`` adds (or replaces) the kind ``kind``.
      ``build(state, **layer_kwargs) -> nn.Module`` makes the new layer from a
      :class:`BatchNormState`; when omitted, ``TargetClass`` must subclass
      :class:`~rethinkbn.layers.BatchNormBase` and the layer is
      ``TargetClass(state.num_features, **state.options(), **layer_kwargs)`` with the state's
      tensors installed (:meth:`BatchNormState.install`). Layers of exactly ``TargetClass`` are
      read back as BatchNormBase state, so they convert onwards and revert.
    * ``register_converter(kind, source=SourceClass, build=fn)`` converts modules of exactly
      ``SourceClass`` (for example a BatchNorm fused with an activation) to ``kind`` (``"*"``:
      every kind) with ``fn(module, **layer_kwargs) -> nn.Module``; ``fn`` must not change
      ``module``. Without such a converter, torch BatchNorm subclasses are skipped with a warning.

    Side effect: changes the module-level registry (later calls replace earlier ones).
    """
    if not isinstance(to, str) or not to:
        raise TypeError(f"register_converter: expected a kind name (str), got {to!r}")
    if (target is None) == (source is None):
        raise TypeError(
            "register_converter: pass exactly one of target= (a new kind) or source= (a source "
            f"type), got target={target!r}, source={source!r}"
        )
    if source is not None:
        if build is None:
            raise TypeError(f"register_converter: source={source.__name__} needs build=fn")
        SOURCE_CONVERTERS[(source, to)] = build
        return
    assert target is not None
    if build is None:
        if not issubclass(target, BatchNormBase):
            raise TypeError(
                f"register_converter: {target.__name__} does not subclass BatchNormBase, so "
                "pass build=fn(state, **layer_kwargs) -> nn.Module"
            )
        build = _build_family(target)
    KINDS[to] = Kind(to, target, build)
    if issubclass(target, BatchNormBase):
        READERS[target] = read_family


def _build_torch(
    state: BatchNormState, torch_class: type[_BatchNorm] | None = None, **layer_kwargs: Any
) -> nn.Module:
    cls: type[nn.Module] = torch_class or state.torch_class or DEFAULT_TORCH_CLASS
    if state.post:
        # timm's norm-act counterpart of the torch class (BatchNorm2d -> BatchNormAct2d)
        variant = act_variant(cls)
        if variant is None:
            raise ValueError(
                f"it applies {', '.join(type(m).__name__ for m in state.post.values())} after "
                f"normalizing, and {cls.__name__} has no norm-act counterpart registered (timm's "
                "BatchNormAct2d / SyncBatchNormAct are, once timm is imported)"
            )
        cls = variant
    if state.affine and state.bias is None:
        layer_kwargs["bias"] = False
    options = {**state.options(), **state.sync_options(cls, layer_kwargs), **layer_kwargs}
    return state.install(cls(state.num_features, **options))


register_converter("torch", nn.BatchNorm2d, build=_build_torch)


def _build_domain(state: BatchNormState, **layer_kwargs: Any) -> nn.Module:
    options = state.options()
    # DomainBatchNorm's affine says how weight and bias are shared ("shared" / "domain"); a layer
    # without them stays without them.
    if not options.pop("affine"):
        layer_kwargs["affine"] = False
    layer = DomainBatchNorm(state.num_features, **{**options, **layer_kwargs})
    return state.install(layer)


register_converter("ghost", GhostBatchNorm)
register_converter("frozen", FrozenBatchNorm)
register_converter("domain", DomainBatchNorm, build=_build_domain)
