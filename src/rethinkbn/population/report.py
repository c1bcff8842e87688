"""EMA diagnostics: how far the running (EMA) statistics are from the model's current population.

The paper's Fig. 2: the EMA mean of a BatchNorm layer often falls outside the distribution of the
per-batch means of the current model, most of all early in training, because the EMA lags the
weights. :func:`ema_report` measures that per layer, without changing the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import in_context
from .._model import running_buffers
from ..stats import Moments
from ._state import check_model_first
from .options import PreciseBNOptions, options_from, with_options
from .precise import PassReport, distances, estimate

__all__ = ["EMALayerReport", "EMAReport", "ema_report"]


@dataclass(frozen=True)
class EMALayerReport:
    """One layer: EMA vs precise statistics, and where the EMA mean sits among batch means.

    ``mean_shift`` and ``std_log_ratio`` are as in :class:`~rethinkbn.population.LayerReport`
    (old = EMA, new = precise). Over the ``calls`` per-batch means ``mu_b`` of each channel:

        outside_fraction = fraction of channels with mu_EMA < min_b mu_b or mu_EMA > max_b mu_b
        mean_percentile  = mean over channels of  #{b : mu_b < mu_EMA} / calls
    """

    calls: int
    mean_shift: float
    std_log_ratio: float
    outside_fraction: float
    mean_percentile: float


@dataclass(frozen=True)
class EMAReport(PassReport):
    """Per layer (qualified name) an :class:`EMALayerReport`; ``str()`` prints a table."""

    layers: dict[str, EMALayerReport]
    TITLE: ClassVar[str] = "EMA vs precise statistics"
    COLUMNS: ClassVar[tuple[str, ...]] = (
        "batches", "mean shift (sigma)", "log std ratio", "EMA mean outside batch means",
        "EMA mean percentile")

    def row(self, layer: EMALayerReport) -> list[object]:
        return [layer.calls, f"{layer.mean_shift:.4f}", f"{layer.std_log_ratio:.4f}",
                f"{layer.outside_fraction:.1%}", f"{layer.mean_percentile:.1%}"]


def _per_call_like(calls: Moments, buffer: Tensor) -> Moments:
    """Per-call moments shaped like the buffer: per-domain rows merged when the buffer is shared."""
    if calls.mean.dim() == buffer.dim() + 2:  # (calls, domains, C) for a (C,) buffer
        swapped = Moments(*(t.transpose(0, 1) for t in (calls.count, calls.mean, calls.m2)))
        return swapped.total()
    return calls


def _position(ema_mean: Tensor, calls: Moments) -> tuple[float, float]:
    """``(outside_fraction, mean_percentile)`` of the EMA mean among the per-call means."""
    valid = calls.count > 0
    ema = ema_mean.double()
    inf = torch.full_like(calls.mean, float("inf"))
    low = torch.where(valid, calls.mean, inf).amin(0)
    high = torch.where(valid, calls.mean, -inf).amax(0)
    seen = valid.any(0)
    outside = ((ema < low) | (ema > high)) & seen
    below = ((calls.mean < ema) & valid).sum(0) / valid.sum(0).clamp_min(1)
    n_seen = max(int(seen.sum()), 1)
    return float(outside.sum()) / n_seen, float(below[seen].sum()) / n_seen


@with_options()
@in_context("ema_report")
def ema_report(
    model: torch.nn.Module,
    data: Iterable[Any],
    options: PreciseBNOptions | None = None,
    **kwargs: Any,
) -> EMAReport:
    """Compare every BatchNorm layer's running (EMA) statistics with precise ones on ``data``.

    Runs the same pass as :func:`~rethinkbn.population.precise_bn` (same options) and keeps
    every call's batch mean. Side effects: none; the model ends exactly as it was.
    """
    check_model_first(model, data)
    opts = options_from(options, kwargs)
    result, stats = estimate(model, data, opts, label="ema_report")
    layers = {}
    for name, new in stats.items():
        layer = result.layers[name]
        ema_mean, ema_var = running_buffers(layer)  # type: ignore[misc]
        shift, ratio = distances(ema_mean, ema_var, new["running_mean"], new["running_var"],
                                 getattr(layer, "eps", 1e-5))
        calls = result.calls.get(name)
        if calls is None:
            outside = percentile = float("nan")
            n_calls = 0
        else:
            outside, percentile = _position(ema_mean, _per_call_like(calls, ema_mean))
            n_calls = calls.count.shape[0]
        layers[name] = EMALayerReport(n_calls, shift, ratio, outside, percentile)
    return EMAReport(layers, result.num_samples, result.num_batches)
