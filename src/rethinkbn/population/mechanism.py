"""Why a small normalization batch hurts, or only adds noise: the between-sample share of variance.

For one channel of a BatchNorm input, every sample contributes ``L`` values (``L = H*W`` for 2-D
inputs, the length for 1-D sequences, 1 for ``(N, C)`` inputs). The law of total variance splits
the population variance ``var`` into the variance of the per-sample means (``between``) and the
mean within-sample variance; the **between-sample share** is ``rho = between / var``.

Model: sample ``i`` value ``j`` is ``a_i + e_ij`` with i.i.d. samples, ``Var(a) = rho * var`` and
i.i.d. within-sample noise ``Var(e) = (1 - rho) * var``. A group of ``k`` samples (``k*L`` values)
then has a biased variance with expectation

    E[var_k] / var = 1 - rho / k - (1 - rho) / (k * L)

(the population variance minus the variance of the group mean). What a pass measures is the
share ``s`` of the variance of the per-sample means, which also holds ``1/L`` of the
within-sample noise: ``s = rho + (1 - rho) / L``. In ``s`` the expectation needs no model at all
(only i.i.d. samples: the group mean's variance is ``s * var / k``):

    E[var_k] / var = 1 - s / k        (:func:`group_variance_ratio`)

which is the formula above with ``rho`` written through ``s``. Its relative bias
``E[var_k] / var - 1 = -(rho / k + (1 - rho) / (k L))`` is what a model trained with ``k``-sample
statistics sees and population statistics at test time do not: a train/test inconsistency. When
its magnitude is below :data:`INCONSISTENCY_THRESHOLD`, a small NBS mostly adds noise to the
statistics (a regularizer), and population statistics should not lose to mini-batch ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import in_context
from .._model import ROOT_NAME, ModelGuard, batchnorm_layers, select_input, to_device
from ..stats import ACC_DTYPE, Moments

__all__ = [
    "INCONSISTENCY_THRESHOLD",
    "LayerVariance",
    "between_sample_share",
    "expected_variance_ratio",
    "group_variance_ratio",
    "variance_decomposition",
]

INCONSISTENCY_THRESHOLD = 0.10
"""|relative variance bias| above which a k-sample group's statistics count as inconsistent.

Reason: a variance under-estimated by a fraction ``b`` scales the normalized output by
``1 / sqrt(1 - b)``; at ``b = 0.10`` that is a 5% gain change in every channel of every such layer,
which compounds over layers and is comparable to what the paper's ImageNet ResNets show at NBS 2
(their between-sample share is large, Sec. 4); below it the groups' statistics are noisy but
nearly unbiased estimates of the population's, and a small NBS acts as noise injection.
"""


def _check_k_l(k: int, length: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"norm_batch_size must be an int >= 1, got {k!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"values per sample must be an int >= 1, got {length!r}")


def expected_variance_ratio(share: float | Tensor, k: int, length: int) -> float | Tensor:
    """``E[var_k] / var = 1 - share / k - (1 - share) / (k * length)`` (see the module docstring).

    Args:
        share: between-sample share ``rho`` in [0, 1] (float or tensor, per channel).
        k: samples per normalization group (the NBS), >= 1.
        length: values per sample and channel (``L``), >= 1.

    Raises:
        ValueError: ``k`` or ``length`` below 1 or not an int.
    """
    _check_k_l(k, length)
    return 1 - share / k - (1 - share) / (k * length)


def group_variance_ratio(share: float | Tensor, k: int) -> float | Tensor:
    """``E[var_k] / var = 1 - share / k`` for the *measured* share (:func:`between_sample_share`).

    Args:
        share: the variance of the per-sample means over the total variance (float or tensor).
        k: samples per normalization group (the NBS), a positive int.

    Exact for i.i.d. samples whatever the within-sample structure: a ``k``-sample group's biased
    variance falls short of the population's by the variance of its mean, ``share * var / k``.
    Raises ValueError for ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"k must be a positive int, got {k}")
    return 1 - share / k


def _per_sample_means(x: Tensor) -> Tensor:
    return x.flatten(2).mean(-1) if x.dim() > 2 else x


def _split(x: Tensor, where: str) -> tuple[Moments, Moments]:
    """(moments of all values, moments of the per-sample means) of one batch ``(N, C, ...)``."""
    if x.dim() < 2:
        raise ValueError(f"{where}: expected an input of shape (N, C, ...), got {tuple(x.shape)}")
    if x.size(0) == 0:
        raise ValueError(f"{where}: no samples were seen; got an empty batch {tuple(x.shape)}")
    x = x.to(ACC_DTYPE)  # float64 throughout: the share is a ratio of two close quantities
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{where}: the input holds NaN or infinite values")
    return Moments.of(x), Moments.of(_per_sample_means(x))


def _share(total: Moments, between: Moments, where: str) -> Tensor:
    if not bool((total.count > 0).all()):
        raise ValueError(f"{where}: no samples were seen; need at least one non-empty batch")
    var = total.var()
    return torch.where(var > 0, between.var() / var.where(var > 0, torch.ones_like(var)),
                       torch.full_like(var, float("nan")))


def between_sample_share(x: Tensor) -> Tensor:
    """Per-channel between-sample share of ``x`` (``(N, C, ...)``), float64 of shape ``(C,)``.

    ``share[c] = var_i(mean_j x[i, c, j]) / var_{i,j}(x[i, c, j])`` (biased variances, i.e. the
    population of the ``N`` samples). It is 1 for ``(N, C)`` inputs and NaN for a constant channel.

    Raises:
        ValueError: fewer than 2 dims, an empty batch, or NaN/infinite values.
    """
    total, between = _split(x, "between_sample_share")
    return _share(total, between, "between_sample_share")


@dataclass(frozen=True)
class LayerVariance:
    """The variance decomposition of one BN layer's input over a pass.

    ``share`` is per channel (float64, NaN for constant channels); ``values_per_sample`` is ``L``;
    ``norm_batch_size`` is the ``k`` the bias is computed for.
    """

    name: str
    share: Tensor
    values_per_sample: int
    norm_batch_size: int

    @property
    def mean_share(self) -> float:
        """Mean share over channels with a defined share (NaN if none)."""
        ok = self.share[~self.share.isnan()]
        return float(ok.mean()) if ok.numel() else math.nan

    @property
    def variance_bias(self) -> float:
        """Expected relative bias ``E[var_k] / var - 1`` at the layer's mean share (negative)."""
        return float(group_variance_ratio(self.mean_share, self.norm_batch_size)) - 1.0

    @property
    def inconsistent(self) -> bool:
        """Whether ``|variance_bias|`` exceeds :data:`INCONSISTENCY_THRESHOLD`."""
        return abs(self.variance_bias) > INCONSISTENCY_THRESHOLD


@in_context("variance_decomposition")
def variance_decomposition(
    model: nn.Module,
    data: Iterable[Any],
    norm_batch_size: int,
    *,
    max_batches: int | None = None,
    input_key: Any = None,
    device: torch.device | str | None = None,
) -> list[LayerVariance]:
    """Between-sample share of every BN layer's input over ``data``, one entry per layer.

    The model runs in eval mode without gradients (the inputs the deployed model's BN layers see);
    forward-pre-hooks on each BN layer accumulate float64 :class:`~rethinkbn.stats.Moments` of all
    values and of the per-sample means. Empty batches contribute nothing.

    Args:
        model: a model holding BatchNorm layers.
        data: batches (a tensor, a tuple/list whose first item is the input, or a mapping with
            ``input_key``).
        norm_batch_size: the ``k`` for :attr:`LayerVariance.variance_bias` (the training NBS).
        max_batches: stop after this many batches.
        input_key: key of the model input in mapping batches.
        device: move batches there first.

    Returns:
        One :class:`LayerVariance` per BN layer, in module order.

    Raises:
        ValueError: no BN layer, a bad ``norm_batch_size``, a layer that saw no sample, or
            NaN/infinite values in a layer's input (naming the layer).

    Side effects: none; flags and hooks are restored in ``finally``.
    """
    _check_k_l(norm_batch_size, 1)
    layers = batchnorm_layers(model, root=ROOT_NAME)
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no BatchNorm layer")
    acc = {name: _Accumulator(f"BN layer {name!r}") for name, _ in layers}
    guard = ModelGuard(model)
    try:
        for name, layer in layers:
            guard.hook(layer.register_forward_pre_hook(acc[name].hook))
        model.eval()
        with torch.no_grad():
            for i, batch in enumerate(data):
                if max_batches is not None and i >= max_batches:
                    break
                model(select_input(to_device(batch, device), input_key))
    finally:
        guard.restore()
    return [acc[name].result(name, norm_batch_size) for name, _ in layers]


@dataclass
class _Accumulator:
    """One layer's float64 moments of all input values and of the per-sample means."""

    where: str
    total: Moments | None = None
    between: Moments | None = None
    length: int = 1

    def hook(self, _layer: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook: merge one (non-empty) input into the moments."""
        x = args[0]
        if x.size(0) == 0:
            return
        total, between = _split(x.detach(), self.where)
        self.total = total if self.total is None else self.total.merge(total)
        self.between = between if self.between is None else self.between.merge(between)
        self.length = int(x[0, 0].numel())

    def result(self, name: str, norm_batch_size: int) -> LayerVariance:
        """The layer's decomposition; ValueError when it saw no sample."""
        if self.total is None or self.between is None:
            raise ValueError(
                f"{self.where}: no samples were seen; need at least one non-empty batch")
        share = _share(self.total, self.between, self.where)
        return LayerVariance(name, share, self.length, norm_batch_size)
