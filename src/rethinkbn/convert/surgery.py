"""Reversible model surgery: swap every BatchNorm of a model for another kind, and back.

Every conversion goes through one plain description of a BatchNorm layer, :class:`BatchNormState`
(its hyper-parameters plus the very Parameter and buffer objects it holds). A layer is *read*
into a state and the state is *built* into the target kind, so any kind converts into any other
and ``revert_batchnorm(convert_batchnorm(model, ...))`` restores the original model exactly:

* parameters are the same ``nn.Parameter`` objects (an optimizer built before the conversion
  keeps training them), except where the target needs another shape (per-domain affine);
* buffers are the same tensors, or per-domain copies of them;
* eps, momentum, affine, track_running_stats, requires_grad, device, dtype and the training
  flag carry over;
* the torch class a layer came from (``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` or timm's
  ``BatchNormAct2d`` / ``SyncBatchNormAct``) is remembered on the converted layer
  (``_rethinkbn_torch_class``), travels in its ``state_dict``'s metadata (a checkpoint loaded
  into layers built directly as rethinkbn layers hands it on) and is what ``revert_batchnorm``
  rebuilds;
* a BatchNorm fused with dropout and an activation (timm's norm-act layers) converts to the
  kind's norm-act class (:mod:`rethinkbn.convert.norm_act`), which keeps the very ``drop`` and
  ``act`` modules.

Kinds are registered by name: ``"torch"`` (torch's own classes), ``"ghost"``, ``"frozen"``,
``"domain"``, and ``"sync"`` once ``rethinkbn.distributed`` is imported (it registers itself
with :func:`register_converter`).
"""

from __future__ import annotations

import fnmatch
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._checks import check_int
from ..layers import (
    BatchNormBase,
    DomainBatchNorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    is_batchnorm,
)
from .norm_act import (
    NormActMixin,
    act_variant,
    norm_act_class,
    plain_class,
    post_modules,
    register_known_libraries,
)

__all__ = [
    "BatchNormState",
    "convert_batchnorm",
    "freeze_bn",
    "register_converter",
    "revert_batchnorm",
    "swap_modules",
    "to_domain_bn",
    "to_ghost_bn",
    "unfreeze_bn",
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

Predicate = Callable[[str, nn.Module], bool]
Builder = Callable[..., nn.Module]
SourceConverter = Callable[..., nn.Module]


@dataclass(frozen=True)
class BatchNormState:
    """What a plain BatchNorm layer holds, read off a layer without copying anything.

    ``weight``, ``bias`` and the running buffers are the layer's own objects. ``torch_class`` is
    the torch class the layer was (or was converted from), ``None`` when unknown.
    """

    name: str
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    training: bool
    torch_class: type[_BatchNorm] | None
    # requires_grad flags an earlier conversion switched off (FrozenBatchNorm's
    # affine_trainable=False), to switch back on when the layer becomes something else.
    requires_grad: Mapping[str, bool] = field(default_factory=dict)
    # The process group of a SyncBatchNorm (torch's or ours), handed on to a target that syncs.
    process_group: Any = None
    # What a norm-act layer applies after normalizing ({"drop": ..., "act": ...}), the very modules.
    post: Mapping[str, nn.Module] = field(default_factory=dict)
    # Written by install(): requires_grad flags to set on the built layer's parameters once every
    # layer of the conversion has been built (setting them earlier would change the source
    # layer's Parameter objects before the conversion is known to succeed).
    pending_requires_grad: dict[str, bool] = field(default_factory=dict, compare=False)

    @property
    def tensors(self) -> dict[str, Tensor | None]:
        return {
            "weight": self.weight,
            "bias": self.bias,
            "running_mean": self.running_mean,
            "running_var": self.running_var,
            "num_batches_tracked": self.num_batches_tracked,
        }

    def options(self) -> dict[str, Any]:
        """Constructor keywords shared by torch's BatchNorm and every rethinkbn layer."""
        like = next((t for t in (self.weight, self.running_mean) if t is not None), None)
        return {
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "device": None if like is None else like.device,
            "dtype": None if like is None else like.dtype,
        }

    def sync_options(self, cls: type[nn.Module], layer_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """``process_group=`` for a target class that syncs, unless the caller chose a group."""
        chosen = {"process_group", "group_size"} & set(layer_kwargs)
        if self.process_group is None or chosen:
            return {}
        if "process_group" not in inspect.signature(cls.__init__).parameters:
            return {}
        return {"process_group": self.process_group}

    def install(self, layer: nn.Module) -> nn.Module:
        """Give ``layer`` this state's tensors, training flag and provenance; returns ``layer``.

        A tensor of the same shape is installed as the same object. A per-domain slot of shape
        ``(D, *shape)`` receives ``D`` copies (a new Parameter with the same ``requires_grad``).
        Only ``layer`` is changed, never the tensors of this state: where ``layer`` wants a
        parameter frozen (its own had ``requires_grad=False``) or this state records a flag to
        restore, the change is recorded in :attr:`pending_requires_grad` (replacing what an earlier
        install recorded) for :func:`convert_batchnorm` to apply once every layer has been built.
        """
        pending: dict[str, bool] = {}
        frozen_from: dict[str, bool] = {}
        for key, source in self.tensors.items():
            slot = getattr(layer, key, None)
            if slot is None and source is None:
                continue
            if slot is None or source is None:
                raise ValueError(
                    f"{self.name!r}: {type(layer).__name__} expects {key} "
                    f"{'absent' if slot is None else tuple(slot.shape)}, the layer has "
                    f"{'none' if source is None else tuple(source.shape)}"
                )
            if slot.shape == source.shape:
                value = source
            elif slot.shape[1:] == source.shape:
                value = source.detach().expand_as(slot).clone()
                if isinstance(source, nn.Parameter):
                    value = nn.Parameter(value, requires_grad=source.requires_grad)
            else:
                raise ValueError(
                    f"{self.name!r}: {type(layer).__name__} expects {key} of shape "
                    f"{tuple(slot.shape)}, the layer has {tuple(source.shape)}"
                )
            if isinstance(slot, nn.Parameter) and isinstance(source, nn.Parameter):
                if not slot.requires_grad:
                    pending[key] = False
                    frozen_from[key] = self.requires_grad.get(key, source.requires_grad)
                elif key in self.requires_grad:
                    pending[key] = self.requires_grad[key]
            setattr(layer, key, value)
        self.pending_requires_grad.clear()
        self.pending_requires_grad.update(pending)
        if frozen_from:
            layer._rethinkbn_requires_grad = frozen_from  # type: ignore[assignment]
        layer.train(self.training)
        layer._rethinkbn_name = self.name  # type: ignore[assignment]
        if self.torch_class not in (None, type(layer)):
            layer._rethinkbn_torch_class = self.torch_class  # type: ignore[assignment]
        return layer


# ---------------------------------------------------------------------------- reading layers
def _read_torch(module: nn.Module, name: str, domain: int | None) -> BatchNormState:
    assert isinstance(module, _BatchNorm)
    return BatchNormState(
        name=name,
        num_features=module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        weight=module.weight,
        bias=module.bias,
        running_mean=module.running_mean,
        running_var=module.running_var,
        num_batches_tracked=module.num_batches_tracked,
        training=module.training,
        torch_class=getattr(module, "_rethinkbn_torch_class", type(module)),
        process_group=getattr(module, "process_group", None),
        post=post_modules(module),
    )


def _read_family(module: nn.Module, name: str, domain: int | None) -> BatchNormState:
    """Read a rethinkbn layer; per-domain tensors (one more dim) give up row ``domain``."""
    assert isinstance(module, BatchNormBase)
    # A plain layer holds (C,) tensors and a scalar count; per-domain ones have a leading D dim.
    plain_dims = {"weight": 1, "bias": 1, "running_mean": 1, "running_var": 1,
                  "num_batches_tracked": 0}
    tensors = {key: getattr(module, key) for key in plain_dims}
    per_domain = [k for k, t in tensors.items() if t is not None and t.dim() > plain_dims[k]]
    if per_domain:
        rows = tensors[per_domain[0]].shape[0]  # type: ignore[union-attr]
        if domain is None or not 0 <= domain < rows:
            raise ValueError(
                f"{name!r} ({type(module).__name__}) holds per-domain {', '.join(per_domain)} "
                f"for {rows} domains: pass domain=k with 0 <= k < {rows} to choose whose to keep, "
                f"got domain={domain!r}"
            )
        for key in per_domain:
            row = tensors[key][domain].detach().clone()  # type: ignore[index]
            source = tensors[key]
            tensors[key] = (
                nn.Parameter(row, requires_grad=source.requires_grad)
                if isinstance(source, nn.Parameter)
                else row
            )
    return BatchNormState(
        name=name,
        num_features=module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=tensors["weight"] is not None,
        track_running_stats=module.track_running_stats,
        training=module.training,
        torch_class=getattr(module, "_rethinkbn_torch_class", None),
        requires_grad=getattr(module, "_rethinkbn_requires_grad", {}),
        process_group=getattr(module, "process_group", None),
        post=post_modules(module),
        **tensors,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class _Kind:
    name: str
    cls: type[nn.Module]
    build: Builder


_KINDS: dict[str, _Kind] = {}
_READERS: dict[type[nn.Module], Callable[[nn.Module, str, int | None], BatchNormState]] = {
    cls: _read_torch for cls in TORCH_CLASSES
}
_SOURCE_CONVERTERS: dict[tuple[type[nn.Module], str], SourceConverter] = {}


def _reader(cls: type[nn.Module]) -> Callable[[nn.Module, str, int | None], BatchNormState] | None:
    """How to read a layer of exactly ``cls`` into a state; None for a type no kind knows."""
    reader = _READERS.get(cls)
    if reader is None and issubclass(cls, NormActMixin) and issubclass(cls, BatchNormBase):
        reader = _read_family  # a norm-act class made for a kind (rethinkbn.convert.norm_act)
    return reader


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
        _SOURCE_CONVERTERS[(source, to)] = build
        return
    assert target is not None
    if build is None:
        if not issubclass(target, BatchNormBase):
            raise TypeError(
                f"register_converter: {target.__name__} does not subclass BatchNormBase, so "
                "pass build=fn(state, **layer_kwargs) -> nn.Module"
            )
        build = _build_family(target)
    _KINDS[to] = _Kind(to, target, build)
    if issubclass(target, BatchNormBase):
        _READERS[target] = _read_family


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


# ---------------------------------------------------------------------------- selection
def _patterns(value: str | Sequence[str] | None, arg: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{arg}= expects glob patterns (str or a sequence of str), got {value!r}")
    return patterns


def _resolve_kind(to: str | type[nn.Module], layer_kwargs: dict[str, Any]) -> _Kind:
    """The registered kind ``to`` names; a torch class becomes ``"torch"`` plus ``torch_class``."""
    if to in TORCH_CLASSES:
        if layer_kwargs.setdefault("torch_class", to) is not to:
            raise ValueError(
                f"convert_batchnorm: to={to.__name__} contradicts "  # type: ignore[union-attr]
                f"torch_class={layer_kwargs['torch_class']!r}"
            )
        to = "torch"
    kind = next(
        (k for k in _KINDS.values() if to == k.name or (to is k.cls and k.name != "torch")), None
    )
    if kind is None:
        hint = " (import rethinkbn.distributed to register it)" if to == "sync" else ""
        raise ValueError(
            f"convert_batchnorm: unknown target {to!r}{hint}; expected one of "
            f"{sorted(_KINDS)}, or a class: {[c.__name__ for c in TORCH_CLASSES]} or "
            f"{sorted(k.cls.__name__ for k in _KINDS.values() if k.name != 'torch')}"
        )
    wanted = layer_kwargs.get("torch_class")
    if wanted is not None and (kind.name != "torch" or wanted not in TORCH_CLASSES):
        raise ValueError(
            f"convert_batchnorm: torch_class= only goes with to='torch' and must be one of "
            f"{[c.__name__ for c in TORCH_CLASSES]}, got to={to!r}, torch_class={wanted!r}"
        )
    return kind


def _already(module: nn.Module, kind: _Kind, layer_kwargs: Mapping[str, Any]) -> bool:
    """Whether ``module`` is already what the conversion would build, so it is left alone."""
    if kind.name == "torch":
        if not isinstance(module, _BatchNorm):
            return False
        # A torch subclass (timm's BatchNormAct2d) is a torch layer already, unless another torch
        # class is asked for; a norm-act layer's target is that class's norm-act counterpart.
        target = layer_kwargs.get("torch_class") or getattr(
            module, "_rethinkbn_torch_class", type(module)
        )
        if post_modules(module):
            target = act_variant(target) or target
        return type(module) is target
    return plain_class(type(module)) is kind.cls and not layer_kwargs


@dataclass(frozen=True)
class _Site:
    name: str
    module: nn.Module


def _batchnorm_sites(model: nn.Module) -> list[_Site]:
    """Every BatchNorm-like module once, under its first qualified name (``named_modules``)."""
    return [
        _Site(name, module)
        for name, module in model.named_modules()
        if is_batchnorm(module) or any(type(module) is s for s, _ in _SOURCE_CONVERTERS)
    ]


def _selected(
    site: _Site,
    include: tuple[str, ...] | None,
    exclude: tuple[str, ...] | None,
    predicate: Predicate | None,
) -> bool:
    def hits(patterns: Iterable[str]) -> bool:
        return any(fnmatch.fnmatchcase(site.name, p) for p in patterns)

    return (
        (include is None or hits(include))
        and not (exclude is not None and hits(exclude))
        and (predicate is None or bool(predicate(site.name, site.module)))
    )


# ---------------------------------------------------------------------------- conversion
def convert_batchnorm(
    model: nn.Module,
    to: str | type[nn.Module],
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    predicate: Predicate | None = None,
    domain: int | None = None,
    **layer_kwargs: Any,
) -> nn.Module:
    """Replace every selected BatchNorm of ``model`` by a layer of kind ``to``; returns the model.

    ``to`` is a kind name (``"torch"``, ``"ghost"``, ``"frozen"``, ``"domain"``, ``"sync"`` once
    registered) or a class (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, ``GhostBatchNorm``,
    ...). ``layer_kwargs`` go to the new layers' constructors (``norm_batch_size=``,
    ``num_domains=``, ...; ``torch_class=`` for ``"torch"``).

    Selection: a BatchNorm is converted when its qualified name (``model.named_modules()``'s,
    ``""`` for the root) matches one of the ``include`` glob patterns (default: all), none of
    ``exclude``, and ``predicate(name, module)`` is true. A module reused at several places is
    judged by its first name, converted once and stays shared. Layers already of the target kind
    (with no ``layer_kwargs``) are left alone. A norm-act layer (timm's ``BatchNormAct2d`` /
    ``SyncBatchNormAct``, once timm is imported, or one registered with
    :func:`~rethinkbn.convert.norm_act.register_norm_act`) becomes the kind's norm-act class,
    keeping its ``drop`` and ``act``. Other subclasses of torch's BatchNorm that carry more
    behaviour are skipped with a warning unless a converter is registered for that exact type
    (:func:`register_converter`).

    ``domain`` picks which domain's statistics and affine parameters a
    :class:`~rethinkbn.layers.DomainBatchNorm` with per-domain tensors hands on; without it such
    a layer raises an error.

    Side effects: ``model`` is changed in place (its submodules are replaced). Every new layer
    gets ``_rethinkbn_name`` (its qualified name), ``_rethinkbn_torch_class``, and the forward
    and backward hooks of the layer it replaces (handles keep working). Every new layer
    is built before the first replacement, so an error (naming the layer and the value) leaves
    the model exactly as it was. When nothing is selected, a warning is issued and the model is
    returned unchanged. When the root itself is converted, the new root is returned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_batchnorm: expected an nn.Module, got {type(model).__name__}")
    check_int(domain, "domain", "convert_batchnorm", minimum=0, allow_none=True)
    register_known_libraries()
    kind = _resolve_kind(to, layer_kwargs)
    include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")

    replacements: dict[int, nn.Module] = {}
    pending: list[tuple[nn.Module, Mapping[str, bool]]] = []  # requires_grad flags to set last
    skipped: list[str] = []
    unknown: list[str] = []  # reverted without a record of their torch class
    for site in _batchnorm_sites(model):
        if not _selected(site, include_p, exclude_p, predicate):
            continue
        converted = _convert_one(site, kind, domain, layer_kwargs, skipped, unknown)
        if converted is not None:
            new, flags = converted
            replacements[id(site.module)] = new
            pending.append((new, flags))

    if skipped:
        warnings.warn(
            f"convert_batchnorm: left {len(skipped)} BatchNorm subclass layer(s) unchanged, since "
            f"converting them would drop their extra behaviour: {', '.join(skipped)}; register "
            "a converter for their type with rethinkbn.convert.register_converter(kind, "
            "source=Type, build=fn)",
            stacklevel=2,
        )
    if unknown:
        warnings.warn(
            f"convert_batchnorm: {len(unknown)} layer(s) hold no record of the torch class they "
            f"came from (built as rethinkbn layers, or rebuilt so before loading a checkpoint): "
            f"{', '.join(unknown)}; they become {DEFAULT_TORCH_CLASS.__name__}, the torch class "
            "for every input rank; pass torch_class= to choose",
            stacklevel=2,
        )
    if not replacements:
        warnings.warn(
            f"convert_batchnorm: no BatchNorm layer to convert to {kind.name!r} in "
            f"{type(model).__name__} (include={include!r}, exclude={exclude!r}); the model is "
            "unchanged",
            stacklevel=2,
        )
        return model

    for new, flags in pending:
        for key, flag in flags.items():
            getattr(new, key).requires_grad_(flag)
    swap_modules(model, replacements)
    return replacements.get(id(model), model)


def swap_modules(root: nn.Module, replacements: Mapping[int, nn.Module]) -> None:
    """Put ``replacements[id(m)]`` wherever a submodule ``m`` of ``root`` sits (every place)."""
    for parent in list(root.modules()):
        for key, child in parent._modules.items():
            if child is not None and id(child) in replacements:
                parent._modules[key] = replacements[id(child)]


def _convert_one(
    site: _Site,
    kind: _Kind,
    domain: int | None,
    layer_kwargs: dict[str, Any],
    skipped: list[str],
    unknown: list[str],
) -> tuple[nn.Module, Mapping[str, bool]] | None:
    """The new layer for ``site`` and the requires_grad flags to set on it last; None: skipped."""
    module, source_type = site.module, type(site.module)
    custom = _SOURCE_CONVERTERS.get((source_type, kind.name)) or _SOURCE_CONVERTERS.get(
        (source_type, "*")
    )
    reader = _reader(source_type)
    already = _already(module, kind, layer_kwargs)
    if custom is None and (reader is None or already):
        if not already:
            skipped.append(f"{site.name!r} ({source_type.__name__})")
        return None
    shown = ", ".join(f"{k}={v!r}" for k, v in layer_kwargs.items())
    try:
        if custom is not None:
            new = custom(module, **layer_kwargs)
            new._rethinkbn_name = site.name
            return _carry_hooks(module, new), {}
        state = reader(module, site.name, domain)  # type: ignore[misc]
        if kind.name == "torch" and state.torch_class is None and "torch_class" not in layer_kwargs:
            unknown.append(f"{site.name!r} ({source_type.__name__})")
        if state.affine and state.bias is None and kind.name != "torch":
            raise ValueError(
                "it has a weight but no bias (torch's bias=False); rethinkbn layers expect both"
            )
        new = _carry_hooks(module, attach_post(kind.build(state, **layer_kwargs), state))
        return new, state.pending_requires_grad
    except (TypeError, ValueError) as err:
        raise type(err)(
            f"convert_batchnorm: cannot convert {site.name!r} ({source_type.__name__}) to "
            f"{kind.name!r}{' with ' + shown if shown else ''}: {err}"
        ) from err


# Every per-module hook slot of nn.Module (the dicts, and the flag of full backward hooks).
HOOK_ATTRS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
)


def has_hooks(module: nn.Module) -> bool:
    """Whether any hook is registered on ``module`` itself."""
    return any(getattr(module, attr, None) for attr in HOOK_ATTRS)


def _carry_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    # The new layer takes over the very hook dicts, so the handles given out for the old layer
    # still remove the hooks.
    for attr in HOOK_ATTRS:
        if hasattr(old, attr):
            object.__setattr__(new, attr, getattr(old, attr))
    return new


# ---------------------------------------------------------------------------- thin helpers
def revert_batchnorm(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    predicate: Predicate | None = None,
    domain: int | None = None,
    torch_class: type[_BatchNorm] | None = None,
) -> nn.Module:
    """Turn rethinkbn layers back into torch BatchNorm; ``convert_batchnorm(model, "torch")``.

    Each layer becomes the torch class it was converted from (recorded on the layer, so kept by
    ``copy.deepcopy`` and ``torch.save(model)``, and in the metadata of its ``state_dict``, so a
    checkpoint loaded into layers built as rethinkbn layers hands it on); ``torch_class=``
    chooses another. A layer with no such record (built as a rethinkbn layer and never given a
    converted layer's checkpoint) becomes ``nn.SyncBatchNorm``, the torch class that
    accepts every input rank and, without an initialized process group, computes exactly what
    ``BatchNorm1d/2d/3d`` compute; a warning names those layers unless ``torch_class=`` is given.
    A DomainBatchNorm with per-domain statistics or affine parameters needs ``domain=k`` (keep
    domain ``k``'s); otherwise it raises. Side effects as in :func:`convert_batchnorm`.
    """
    kwargs: dict[str, Any] = {} if torch_class is None else {"torch_class": torch_class}
    return convert_batchnorm(
        model, "torch", include=include, exclude=exclude, predicate=predicate, domain=domain,
        **kwargs,
    )


def to_ghost_bn(model: nn.Module, norm_batch_size: int, **kwargs: Any) -> nn.Module:
    """``convert_batchnorm(model, "ghost", norm_batch_size=norm_batch_size, **kwargs)``."""
    return convert_batchnorm(model, "ghost", norm_batch_size=norm_batch_size, **kwargs)


def freeze_bn(model: nn.Module, **kwargs: Any) -> nn.Module:
    """``convert_batchnorm(model, "frozen", **kwargs)``: normalize with the population statistics.

    The layers keep their eps and momentum, so :func:`unfreeze_bn` restores them exactly.
    """
    return convert_batchnorm(model, "frozen", **kwargs)


def unfreeze_bn(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Revert the FrozenBatchNorm layers of ``model`` (only those) to torch BatchNorm."""
    user = kwargs.pop("predicate", None)

    def frozen(name: str, module: nn.Module) -> bool:
        return isinstance(module, FrozenBatchNorm) and (user is None or user(name, module))

    return revert_batchnorm(model, predicate=frozen, **kwargs)


def to_domain_bn(model: nn.Module, num_domains: int, **kwargs: Any) -> nn.Module:
    """``convert_batchnorm(model, "domain", num_domains=num_domains, **kwargs)``.

    Per-domain buffers (and per-domain affine parameters with ``affine="domain"``) start as copies
    of the single layer's.
    """
    return convert_batchnorm(model, "domain", num_domains=num_domains, **kwargs)

