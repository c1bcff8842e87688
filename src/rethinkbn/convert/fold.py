"""Fold inference-mode BatchNorm into the convolution or linear layer that feeds it.

In eval mode a BatchNorm that normalizes with one set of population statistics is a per-channel
affine map,

    bn(z) = gamma * (z - mean) / sqrt(var + eps) + beta = scale * z + shift,
    scale = gamma / sqrt(var + eps),      shift = beta - mean * scale,

so ``bn(conv(x))`` equals a single convolution with weight ``W * scale`` (per output channel) and
bias ``b * scale + shift``. The same holds for ``nn.Linear`` (output features are BatchNorm's
channels when the input is ``(N, in_features)``) and for transposed convolutions, whose output
channels are the weight's *second* dim within each group.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import Any, TypeGuard

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten

from ..layers import BatchNormBase, is_batchnorm
from ..layers.functional import scale_shift
from .norm_act import post_modules, register_known_libraries
from .registry import reader
from .surgery import has_hooks, swap_modules

__all__ = ["FoldedLinear", "fold_batchnorm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PRODUCERS = (*_CONVS, *_CONV_TRANSPOSES, nn.Linear)
# What a pair is made of: the layer that absorbs, and the BatchNorm it absorbs.
_Producer = nn.Linear | _ConvNd
_Norm = _BatchNorm | BatchNormBase


class FoldedLinear(nn.Linear):
    """A Linear layer with a BatchNorm1d folded in; accepts only ``(N, in_features)`` inputs.

    BatchNorm normalizes dim 1 while Linear writes its features to the last dim; the two agree
    only for 2-D inputs, so any other input is refused rather than silently mis-normalized.
    """

    def forward(self, input: Tensor) -> Tensor:
        """``input @ weight.T + bias`` for ``input`` of shape ``(N, in_features)``; raises
        ``ValueError`` for any other rank."""
        if input.dim() != 2:
            raise ValueError(
                f"FoldedLinear (Linear + BatchNorm1d folded by fold_batchnorm): expected an input "
                f"of shape (N, {self.in_features}), got shape {tuple(input.shape)}; fold only "
                "models whose Linear+BatchNorm1d pairs see 2-D inputs"
            )
        return super().forward(input)


def fold_batchnorm(model: nn.Module, example_inputs: tuple[Any, ...] | None = None) -> nn.Module:
    """A folded copy of ``model`` in eval mode; ``model`` itself is left untouched.

    Each foldable BatchNorm is merged into the layer that feeds it (see the module docstring)
    and replaced by ``nn.Identity``; the folded layer gets the new weight and bias (computed in
    float64, stored in the layer's dtype). Folded ``nn.Linear`` layers become
    :class:`FoldedLinear`. Outputs equal the unfolded eval-mode model's up to rounding.

    A BatchNorm is folded when all of these hold:

    * it is torch's ``BatchNorm1d/2d/3d`` / ``SyncBatchNorm`` with running statistics, or a
      rethinkbn layer (FrozenBatchNorm, GhostBatchNorm, ...) that in eval mode normalizes with
      one ``(C,)`` set of running statistics (not DomainBatchNorm's per-domain ones), or a
      norm-act layer of these (timm's ``BatchNormAct2d`` / ``SyncBatchNormAct``, rethinkbn's
      ``GhostBatchNormAct``, ...), whose ``drop`` and ``act`` stay in its place as an
      ``nn.Sequential`` with the same child names; other subclasses with more behaviour are
      never folded;
    * its only input is the output of an ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or
      ``nn.Linear`` (exact types, not parametrized) and nothing else uses that output: checked
      on the ``torch.fx`` graph of the model, or, for a module that does not trace, by adjacency
      inside ``nn.Sequential`` containers (its children are tried the same way);
    * both modules appear once in the model, are called once, have no hooks, and their tensors
      are not read elsewhere in the forward.

    Caveats: the data flow checked is the one ``torch.fx`` traces for the copy in eval mode; a
    forward that takes another path later (a branch on a module attribute that changes) is not
    covered. Below a module whose forward does not trace, the data flow is not known: the pairs
    found there (by adjacency, or in traced children) are folded only on the assumption that the
    untraced forward calls them only through their container. That assumption is checked when
    ``example_inputs`` (a tuple of positional inputs) is given: the folded copy is run on it
    beside the original in eval mode, and if the outputs differ (beyond rounding: 1e-4 of the
    output's largest magnitude) those untraced pairs are left unfolded, with a warning. Without
    ``example_inputs`` the untraced pairs are folded with a ``UserWarning`` naming them.

    The result's ``state_dict`` lacks the folded BatchNorm entries. Returns the folded copy.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm: expected an nn.Module, got {type(model).__name__}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise TypeError("fold_batchnorm: example_inputs is a tuple of the model's positional "
                        f"inputs, got {type(example_inputs).__name__}")
    register_known_libraries()
    folded, untraced = _fold(model, fold_untraced=True)
    if not untraced:
        return folded
    names = ", ".join(f"{p} -> {b}" for p, b in untraced)
    if example_inputs is None:
        warnings.warn(
            f"fold_batchnorm: the forward of a module above {names} does not trace with "
            "torch.fx, so these pairs were folded by nn.Sequential adjacency without knowing "
            "whether that forward also uses them elsewhere; pass example_inputs=(x,) to check "
            "the folded copy against the model", UserWarning, stacklevel=2)
        return folded
    if _same_outputs(copy.deepcopy(model).eval(), folded, example_inputs):
        return folded
    warnings.warn(
        f"fold_batchnorm: folding the untraced pairs {names} changed the model's outputs on "
        "example_inputs (the untraced forward uses them elsewhere); they are left unfolded",
        UserWarning, stacklevel=2)
    return _fold(model, fold_untraced=False)[0]


def _fold(model: nn.Module, fold_untraced: bool) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A folded eval copy, and the (producer, bn) names of the pairs folded below an untraced
    forward."""
    folded = copy.deepcopy(model).eval()
    names = {id(m): n for n, m in folded.named_modules()}
    paths = Counter(id(m) for _, m in folded.named_modules(remove_duplicate=False))
    replacements: dict[int, nn.Module] = {}
    untraced: list[tuple[str, str]] = []
    for producer, bn, traced in list(_pairs(folded)):
        if paths[id(producer)] != 1 or paths[id(bn)] != 1 or not (traced or fold_untraced):
            continue
        replacements[id(producer)] = _fold_pair(producer, bn)
        replacements[id(bn)] = _after_fold(bn)
        if not traced:
            untraced.append((names[id(producer)], names[id(bn)]))
    swap_modules(folded, replacements)
    return folded, untraced


def _same_outputs(model: nn.Module, folded: nn.Module, inputs: tuple[Any, ...]) -> bool:
    with torch.no_grad():
        want, _ = tree_flatten(model(*inputs))
        got, _ = tree_flatten(folded(*inputs))
    if len(want) != len(got):
        return False
    for a, b in zip(want, got, strict=True):
        if isinstance(a, Tensor) != isinstance(b, Tensor):
            return False
        if isinstance(a, Tensor):
            a, b = a.double(), b.double()
            if a.shape != b.shape or not torch.allclose(
                    b, a, rtol=0, atol=1e-4 * max(a.abs().max().item() if a.numel() else 0, 1e-12)):
                return False
    return True


def _after_fold(bn: nn.Module) -> nn.Module:
    """What stays of a folded BatchNorm: nothing, or a norm-act layer's ``drop`` then ``act``
    (under the same names, so their state_dict keys do not change)."""
    post = post_modules(bn)
    return nn.Sequential(OrderedDict(post)) if post else nn.Identity()


# ---------------------------------------------------------------------------- finding pairs
def _foldable_bn(module: nn.Module) -> TypeGuard[_Norm]:
    # (_BatchNorm, BatchNormBase) is what is_batchnorm accepts, spelled so that mypy narrows it
    if reader(type(module)) is None or not isinstance(module, (_BatchNorm, BatchNormBase)):
        return False
    if isinstance(module, BatchNormBase):
        if module._uses_batch_stats():
            return False
    elif module.running_mean is None:
        return False
    tensors = (module.weight, module.bias, module.running_mean, module.running_var)
    return all(t is None or t.dim() == 1 for t in tensors)


def _foldable_producer(module: nn.Module, bn: _Norm) -> TypeGuard[_Producer]:
    if type(module) not in _PRODUCERS or parametrize.is_parametrized(module):
        return False
    assert isinstance(module, _PRODUCERS)  # its exact type is one of them
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return False
    out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    return out == bn.num_features and not has_hooks(module) and not has_hooks(bn)


class _Tracer(fx.Tracer):
    """Keeps BatchNorm layers and the layers that can absorb them as single graph nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            is_batchnorm(m)
            or isinstance(m, _PRODUCERS)
            or super().is_leaf_module(m, module_qualified_name)
        )


def _pairs(module: nn.Module, traced: bool = True) -> Iterator[tuple[_Producer, _Norm, bool]]:
    """(producer, BatchNorm, traced) for the pairs inside ``module`` whose data flow allows
    folding; ``traced`` is False for a pair below a forward that does not trace (its data flow
    there is assumed, not known)."""
    try:
        graph = _Tracer().trace(module)
    except Exception:  # noqa: BLE001 - any user forward may fail to trace; fall back, never fail
        graph = None
    if graph is not None:
        yield from ((p, b, traced) for p, b in _graph_pairs(module, graph))
        return
    if type(module) is nn.Sequential:
        children = list(module)
        for first, second in zip(children, children[1:], strict=False):
            if _foldable_bn(second) and _foldable_producer(first, second):
                yield first, second, False
    for child in module.children():
        yield from _pairs(child, traced=False)


def _graph_pairs(root: nn.Module, graph: fx.Graph) -> Iterator[tuple[_Producer, _Norm]]:
    calls: Counter[int] = Counter()
    read = set()  # modules whose parameters or buffers the forward reads directly
    for node in graph.nodes:
        if node.op == "call_module":
            calls[id(root.get_submodule(node.target))] += 1
        elif node.op == "get_attr":
            owner, _, _ = node.target.rpartition(".")
            read.add(id(root.get_submodule(owner)))
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        # a call_module node's target is the module's qualified name
        bn = root.get_submodule(str(node.target))
        producer = root.get_submodule(str(source.target))
        if (
            _foldable_bn(bn)
            and _foldable_producer(producer, bn)
            and calls[id(bn)] == calls[id(producer)] == 1
            and not {id(bn), id(producer)} & read
        ):
            yield producer, bn


# ---------------------------------------------------------------------------- folding
@torch.no_grad()
def _fold_pair(producer: _Producer, bn: _Norm) -> nn.Module:
    """A copy of ``producer`` that computes ``bn(producer(x))``."""
    acc = torch.float64
    assert bn.running_mean is not None and bn.running_var is not None  # _foldable_bn saw them
    scale, shift = scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, acc)

    weight = producer.weight.to(acc)
    if isinstance(producer, _CONV_TRANSPOSES):
        # weight: (in, out / groups, *k); output channel g * (out / groups) + j is [g-th block, j].
        groups = producer.groups
        blocks = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        per_out = scale.reshape(groups, 1, -1, *([1] * (weight.dim() - 2)))
        weight = (blocks * per_out).reshape(weight.shape)
    else:
        weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    bias = shift if producer.bias is None else producer.bias.to(acc) * scale + shift

    dtype, device = producer.weight.dtype, producer.weight.device
    fused: _Producer
    if isinstance(producer, nn.Linear):
        fused = FoldedLinear(producer.in_features, producer.out_features, device=device,
                             dtype=dtype)
    else:
        fused = copy.deepcopy(producer)
    fused.weight = nn.Parameter(weight.to(dtype), requires_grad=producer.weight.requires_grad)
    fused.bias = nn.Parameter(bias.to(device=device, dtype=dtype),
                              requires_grad=producer.weight.requires_grad)
    return fused
