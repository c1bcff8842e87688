"""One plain description of a BatchNorm layer, :class:`BatchNormState`, and reading layers into it.

Every conversion reads a layer into a state and builds the state into the target kind (see
:mod:`rethinkbn.convert.surgery`). The bottom of ``rethinkbn.convert``: it imports only the layers.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import BatchNormBase

__all__ = ["POST_MODULES", "BatchNormState", "post_modules", "read_family", "read_torch"]

# The children a norm-act layer applies after normalizing, in this order (timm's names).
POST_MODULES = ("drop", "act")


def post_modules(module: nn.Module) -> dict[str, nn.Module]:
    """``{"drop": ..., "act": ...}`` of a norm-act layer (the ones it has), else ``{}``."""
    children = module._modules
    return {key: child for key in POST_MODULES if (child := children.get(key)) is not None}


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
        """The layer's own Parameter and buffer objects by ``state_dict`` name (None where the
        layer has none); the very objects, not copies."""
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

    def _fitted(
        self, layer: nn.Module, key: str, slot: Tensor | None, source: Tensor | None
    ) -> Tensor:
        """``source`` as ``layer``'s ``key`` slot wants it: itself, or per-domain copies."""
        if slot is None or source is None:
            raise ValueError(
                f"{self.name!r}: {type(layer).__name__} expects {key} "
                f"{'absent' if slot is None else tuple(slot.shape)}, the layer has "
                f"{'none' if source is None else tuple(source.shape)}"
            )
        if slot.shape == source.shape:
            return source
        if slot.shape[1:] != source.shape:
            raise ValueError(
                f"{self.name!r}: {type(layer).__name__} expects {key} of shape "
                f"{tuple(slot.shape)}, the layer has {tuple(source.shape)}"
            )
        value = source.detach().expand_as(slot).clone()
        if isinstance(source, nn.Parameter):
            value = nn.Parameter(value, requires_grad=source.requires_grad)
        return value

    def install(self, layer: nn.Module) -> nn.Module:
        """Give ``layer`` this state's tensors, training flag and provenance; returns ``layer``.

        A tensor of the same shape is installed as the same object. A per-domain slot of shape
        ``(D, *shape)`` receives ``D`` copies (a new Parameter with the same ``requires_grad``).
        A state with a weight but no bias (torch's ``bias=False``) leaves ``layer`` without a bias.
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
            if key == "bias" and source is None and self.weight is not None:
                # torch's bias=False (a weight, no bias): the new layer holds no bias either, so
                # it computes weight * xhat as torch does and its state_dict keys are torch's.
                layer.register_parameter("bias", None)
                continue
            value = self._fitted(layer, key, slot, source)
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


def read_torch(module: nn.Module, name: str, domain: int | None) -> BatchNormState:
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


def read_family(module: nn.Module, name: str, domain: int | None) -> BatchNormState:
    """Read a rethinkbn layer; per-domain tensors (one more dim) give up row ``domain``."""
    assert isinstance(module, BatchNormBase)
    # A plain layer holds (C,) tensors and a scalar count; per-domain ones have a leading D dim.
    plain_dims = {"weight": 1, "bias": 1, "running_mean": 1, "running_var": 1,
                  "num_batches_tracked": 0}
    tensors = {key: getattr(module, key) for key in plain_dims}
    per_domain = [k for k, t in tensors.items() if t is not None and t.dim() > plain_dims[k]]
    if per_domain:
        rows = tensors[per_domain[0]].shape[0]
        if domain is None or not 0 <= domain < rows:
            raise ValueError(
                f"{name!r} ({type(module).__name__}) holds per-domain {', '.join(per_domain)} "
                f"for {rows} domains: pass domain=k with 0 <= k < {rows} to choose whose to keep, "
                f"got domain={domain!r}"
            )
        for key in per_domain:
            row = tensors[key][domain].detach().clone()
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
        **tensors,
    )
