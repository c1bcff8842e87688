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

This module is the engine (selection, the conversion pass, the swap); the state and its readers
live in :mod:`.state`, the tables in :mod:`.registry`, the builders in :mod:`.kinds`.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._checks import check_int
from .._model import batchnorm_layers
from ..layers import FrozenBatchNorm
from .kinds import attach_post, register_converter
from .norm_act import register_known_libraries
from .registry import (
    DEFAULT_TORCH_CLASS,
    KINDS,
    SOURCE_CONVERTERS,
    TORCH_CLASSES,
    Kind,
    act_variant,
    plain_class,
)
from .registry import reader as _reader
from .state import BatchNormState, post_modules

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

Predicate = Callable[[str, nn.Module], bool]


# ---------------------------------------------------------------------------- selection
def _patterns(value: str | Sequence[str] | None, arg: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{arg}= expects glob patterns (str or a sequence of str), got {value!r}")
    return patterns


def _resolve_kind(to: str | type[nn.Module], layer_kwargs: dict[str, Any]) -> Kind:
    """The registered kind ``to`` names; a torch class becomes ``"torch"`` plus ``torch_class``."""
    if to in TORCH_CLASSES:
        if layer_kwargs.setdefault("torch_class", to) is not to:
            raise ValueError(
                f"convert_batchnorm: to={to.__name__} contradicts "
                f"torch_class={layer_kwargs['torch_class']!r}"
            )
        to = "torch"
    kind = next(
        (k for k in KINDS.values() if to == k.name or (to is k.cls and k.name != "torch")), None
    )
    if kind is None:
        hint = " (import rethinkbn.distributed to register it)" if to == "sync" else ""
        raise ValueError(
            f"convert_batchnorm: unknown target {to!r}{hint}; expected one of "
            f"{sorted(KINDS)}, or a class: {[c.__name__ for c in TORCH_CLASSES]} or "
            f"{sorted(k.cls.__name__ for k in KINDS.values() if k.name != 'torch')}"
        )
    wanted = layer_kwargs.get("torch_class")
    if wanted is not None and (kind.name != "torch" or wanted not in TORCH_CLASSES):
        raise ValueError(
            f"convert_batchnorm: torch_class= only goes with to='torch' and must be one of "
            f"{[c.__name__ for c in TORCH_CLASSES]}, got to={to!r}, torch_class={wanted!r}"
        )
    return kind


def _already(module: nn.Module, kind: Kind, layer_kwargs: Mapping[str, Any]) -> bool:
    """Whether ``module`` is already what the conversion would build, so it is left alone."""
    if kind.name == "torch":
        if not isinstance(module, _BatchNorm):
            return False
        # A torch subclass (timm's BatchNormAct2d) is a torch layer already, unless another torch
        # class is asked for; a norm-act layer's target is that class's norm-act counterpart.
        wanted = layer_kwargs.get("torch_class")
        target: type[nn.Module] = (
            wanted if wanted else getattr(module, "_rethinkbn_torch_class", type(module))
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
    also = tuple({source for source, _ in SOURCE_CONVERTERS})
    return [_Site(name, module) for name, module in batchnorm_layers(model, also=also)]


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
    selection = (_patterns(include, "include"), _patterns(exclude, "exclude"), predicate)

    replacements, pending = _plan(model, kind, domain, layer_kwargs, selection)
    if not replacements:
        warnings.warn(f"convert_batchnorm: no BatchNorm layer to convert to {kind.name!r} in "
                      f"{type(model).__name__} (include={include!r}, exclude={exclude!r}); "
                      "the model is unchanged", stacklevel=2)
        return model

    for new, flags in pending:
        for key, flag in flags.items():
            getattr(new, key).requires_grad_(flag)
    swap_modules(model, replacements)
    return replacements.get(id(model), model)


Selection = tuple[tuple[str, ...] | None, tuple[str, ...] | None, Predicate | None]


def _plan(
    model: nn.Module,
    kind: Kind,
    domain: int | None,
    layer_kwargs: dict[str, Any],
    selection: Selection,
) -> tuple[dict[int, nn.Module], list[tuple[nn.Module, Mapping[str, bool]]]]:
    """Build the new layer of every selected site, changing nothing in ``model``.

    Returns ``{id(old): new}`` and the requires_grad flags to set on each new layer last; warns
    about the layers left alone (a BatchNorm subclass no converter knows) and those reverted
    without a record of their torch class.
    """
    replacements: dict[int, nn.Module] = {}
    pending: list[tuple[nn.Module, Mapping[str, bool]]] = []
    skipped: list[str] = []
    unknown: list[str] = []  # reverted without a record of their torch class
    for site in _batchnorm_sites(model):
        if not _selected(site, *selection):
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
            stacklevel=3,
        )
    if unknown:
        warnings.warn(
            f"convert_batchnorm: {len(unknown)} layer(s) hold no record of the torch class they "
            f"came from (built as rethinkbn layers, or rebuilt so before loading a checkpoint): "
            f"{', '.join(unknown)}; they become {DEFAULT_TORCH_CLASS.__name__}, the torch class "
            "for every input rank; pass torch_class= to choose",
            stacklevel=3,
        )
    return replacements, pending


def swap_modules(root: nn.Module, replacements: Mapping[int, nn.Module]) -> None:
    """Put ``replacements[id(m)]`` wherever a submodule ``m`` of ``root`` sits (every place)."""
    for parent in list(root.modules()):
        for key, child in parent._modules.items():
            if child is not None and id(child) in replacements:
                parent._modules[key] = replacements[id(child)]


def _convert_one(
    site: _Site,
    kind: Kind,
    domain: int | None,
    layer_kwargs: dict[str, Any],
    skipped: list[str],
    unknown: list[str],
) -> tuple[nn.Module, Mapping[str, bool]] | None:
    """The new layer for ``site`` and the requires_grad flags to set on it last; None: skipped."""
    module, source_type = site.module, type(site.module)
    custom = SOURCE_CONVERTERS.get((source_type, kind.name)) or SOURCE_CONVERTERS.get(
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
            new._rethinkbn_name = site.name  # type: ignore[assignment]
            return _carry_hooks(module, new), {}
        state = reader(module, site.name, domain)  # type: ignore[misc]
        if kind.name == "torch" and state.torch_class is None and "torch_class" not in layer_kwargs:
            unknown.append(f"{site.name!r} ({source_type.__name__})")
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

