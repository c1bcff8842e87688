"""Measure: every number of a diagnosis, from the population pass engine and the comparisons.

Stage 1 of :func:`~rethinkbn.diagnosis.diagnose`. The statistics come from
:func:`~rethinkbn.population.precise_bn` (the pass engine: its unwrap, its restore guard, its
batch convention, all :mod:`rethinkbn._model`'s), the comparisons from
:mod:`._compare`; :func:`measure` returns them as :class:`Numbers`, what the judge reads.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from .._model import ROOT_NAME, batchnorm_layers, rank, world_size
from ..distributed import PerDeviceBatchNorm, ShuffledModule
from ..layers import DomainBatchNorm
from ..population import (
    PreciseBNOptions,
    PreciseBNReport,
    Snapshot,
    capture_stats,
    install_stats,
    precise_bn,
)
from ..population.mechanism import group_variance_ratio
from ..stats import Moments
from ._compare import Context, Measured, MetricFn, all_sum, compare, counted_run, is_fixed
from ._records import Behaviour, Data, LayerDiagnosis, MetricKey

__all__ = ["Numbers", "context", "measure"]


def context(model: nn.Module, options: PreciseBNOptions, metric: MetricFn | None) -> Context:
    """The layers, training modes and shuffles of an unwrapped ``model``; ValueError without a
    BatchNorm layer."""
    layers = dict(batchnorm_layers(model, root=ROOT_NAME))
    if not layers:
        raise ValueError(f"diagnose: {type(model).__name__} has no BatchNorm layer")
    # Training behaviour: the modes as they are when the model comes in train mode (an eval-mode
    # BatchNorm inside a training model is frozen); every BatchNorm training otherwise.
    train_modes = {n: (m.training if model.training else True) for n, m in layers.items()}
    # A shuffle before BatchNorm is part of how the model trains: training behaviour runs it.
    shufflers = {name or ROOT_NAME: (m, m.training if model.training else True)
                 for name, m in model.named_modules() if isinstance(m, ShuffledModule)}
    shuffled = {n: s for n in layers for s, (_, on) in shufflers.items()
                if on and (s == ROOT_NAME or n.startswith(s + "."))}
    return Context(model, layers, train_modes, shufflers, shuffled, options, metric)


@dataclass
class _Statistics:
    """The statistics passes: train_data's (and eval_data's) population statistics against the
    running ones, the running statistics as they came in, this rank's first training batch size
    and the group ids of the pass's batches."""

    report: PreciseBNReport
    eval_report: PreciseBNReport | None
    ema: Snapshot
    first: list[int] = field(default_factory=list)
    ids: list[Tensor] = field(default_factory=list)


def _statistics(ctx: Context, train_data: Iterable[Any], eval_data: Iterable[Any] | None,
                group_ids: Any) -> _Statistics:
    """``precise_bn`` over ``train_data`` (recording the first batch's size and the group ids),
    then over ``eval_data`` starting from train_data's statistics (its distances are the domain
    shift); both snapshots go into ``ctx.bank``, the incoming statistics back into the model."""
    ema = capture_stats(ctx.model)
    first: list[int] = []
    ids: list[Tensor] = []

    def recording_forward(_m: nn.Module, batch: Any) -> Any:
        if group_ids is not None:
            ids.append(torch.as_tensor(group_ids(batch)).flatten().cpu())
        if first:
            return ctx.run(batch)
        n, result = counted_run(ctx, batch)
        if n > 0:  # the training batch is the first non-empty one
            first.append(n)
        return result

    with warnings.catch_warnings():  # a loader shorter than the budget is fine here
        warnings.filterwarnings("ignore", message=".*short of the budget", category=RuntimeWarning)
        # no layer keeps running statistics: the EMA check says it is not testable
        warnings.filterwarnings("ignore", message=".*nothing was run", category=RuntimeWarning)
        report = precise_bn(ctx.model, train_data,
                            options=replace(ctx.options, forward=recording_forward))
        ctx.bank["population"] = capture_stats(ctx.model)
        eval_report = None
        if eval_data is not None:
            eval_report = precise_bn(ctx.model, eval_data, options=ctx.options)
            ctx.bank["eval domain"] = capture_stats(ctx.model)
    install_stats(ctx.model, ema)
    return _Statistics(report, eval_report, ema, first, ids)


def per_device_batch(sizes: list[int]) -> int:
    """The per-device training batch: the smallest rank's first non-empty batch (a rank whose
    batches were all empty normalizes nothing; 1 when no rank saw a sample)."""
    return min((n for n in sizes if n > 0), default=1)


def nbs_rule(layer: nn.Module, sizes: list[int], trains: bool) -> tuple[int | None, str]:
    """The layer's normalization batch size in training and how it follows from the per-rank
    first batches ``sizes`` (one per rank): the smallest rank's batch, or their sum for a layer
    synced over all of them."""
    batch = per_device_batch(sizes)
    if is_fixed(layer, trains):
        return None, "fixed statistics (frozen)"
    devices = getattr(layer, "num_devices", None)
    if isinstance(layer, PerDeviceBatchNorm) and devices:
        return max(batch // devices, 1), f"batch {batch} over {devices} virtual devices"
    ghost = getattr(layer, "norm_batch_size", None)
    if ghost is not None:
        return min(ghost, batch), f"ghost groups of {ghost} in a batch of {batch}"
    if hasattr(layer, "process_group"):
        size = world_size(getattr(layer, "process_group", None))
        if size > 1 and size == len(sizes):
            per_rank = f"batch {batch}" if len(set(sizes)) == 1 else f"batches {sizes}"
            return sum(sizes), f"synced: {per_rank} over {size} ranks"
        if size > 1:
            return batch * size, f"synced: batch {batch} x {size} ranks"
    if isinstance(layer, DomainBatchNorm):
        return batch, f"per domain, at most the batch of {batch}"
    return batch, f"per-device batch of {batch}"


def mechanism(parts: tuple[Moments, Moments] | None, nbs: int | None) -> tuple[float, float]:
    """``(between-sample share, expected variance ratio at the NBS)`` of one layer, from the
    moments of all values and of the per-sample means of its input (NaN where not measured).

    ``s_c = var(per-sample means)_c / var(values)_c`` (biased variances: by the law of total
    variance the rest is the mean within-sample variance), averaged over the channels with a
    variance; the ratio is :func:`~rethinkbn.population.mechanism.group_variance_ratio`,
    ``1 - s / k`` (exact for i.i.d. samples: the group mean's variance is ``s * var / k``).
    """
    if parts is None:
        return math.nan, math.nan
    total, between = parts
    var = total.var()
    share = between.var() / var.where(var > 0, torch.ones_like(var))
    share = share[(var > 0) & share.isfinite()]
    if not share.numel():
        return math.nan, math.nan
    s = float(share.mean())
    if nbs is None:
        return s, math.nan
    return s, float(group_variance_ratio(s, nbs))


def _nonfinite_buffers(stats: Mapping[str, Tensor] | None) -> str:
    """Which running buffers of a layer hold NaN or Inf, and how many values ("" for none)."""
    held = [f"{key} holds {int((~torch.isfinite(buf)).sum())} of {buf.numel()}"
            for key, buf in (stats or {}).items() if buf.is_floating_point()
            and not bool(torch.isfinite(buf).all())]
    return f" ({', '.join(held)} values NaN or Inf)" if held else ""


def _row(ctx: Context, name: str, s: _Statistics, on_train: Measured, on_eval: Measured,
         sizes: list[int]) -> LayerDiagnosis:
    """One layer's numbers (see :class:`LayerDiagnosis`)."""
    layer, r = ctx.layers[name], s.report.layers.get(name)
    nbs, rule = nbs_rule(layer, sizes, ctx.train_modes[name])
    if nbs is not None and name in ctx.shuffled:
        rule += f", after ShuffledModule '{ctx.shuffled[name]}''s shuffle (measured with it)"
    positions = r.count / r.samples if r is not None and r.samples else math.nan
    values = int(nbs * positions) if nbs is not None and math.isfinite(positions) else None
    e = s.eval_report.layers.get(name) if s.eval_report is not None else None
    sq, n = on_train.gap.get(name, (0.0, 0.0))
    share, ratio = mechanism(on_train.share(name), nbs)
    return LayerDiagnosis(
        type(layer).__name__, "frozen" if nbs is None else "trains", on_eval.calls.get(name, 0),
        nbs, rule, values, r.mean_shift if r else math.nan, r.std_log_ratio if r else math.nan,
        math.sqrt(sq / n) if n else math.nan, e.mean_shift if e else math.nan,
        e.std_log_ratio if e else math.nan, share, ratio)


def group_mixing(ids: list[Tensor], k: int, seed: int = 0) -> float | None:
    """Distinct ids per contiguous group of ``k`` samples, observed / after a random shuffle."""
    if k < 2 or not ids:
        return None

    def distinct(batches: list[Tensor]) -> float:
        return float(sum(int(torch.unique(b[i:i + k]).numel())
                         for b in batches for i in range(0, len(b) - k + 1, k)))

    flat = torch.cat(ids)
    gen = torch.Generator().manual_seed(seed)
    shuffled = flat[torch.randperm(len(flat), generator=gen)].split([len(b) for b in ids])
    base = distinct(list(shuffled))
    return distinct(ids) / base if base else None


@dataclass(frozen=True)
class Numbers:
    """Everything the judge reads: the per-layer table and the model-level measurements.

    ``pairs[check]``: the metric difference and its standard error behind the model-level
    verdicts ``"ema"`` (population minus EMA), ``"train-test"`` (training behaviour minus
    population statistics) and ``"domain"`` (recomputed minus training-domain statistics);
    None when not measured. ``measured[name]``: which of a layer's quantities were measured;
    ``buffers[name]``: which of its running buffers hold NaN or Inf (text, "" for none).
    ``frozen``: the (mean shift, log std ratio) of frozen layers' statistics vs train_data's.
    """

    layers: dict[str, LayerDiagnosis]
    shuffled: dict[str, str]
    untracked: set[str]
    frozen: dict[str, tuple[float, float]]
    calls: dict[str, int]
    batch_stats_in_eval: set[str]
    pairs: dict[str, tuple[float, float] | None]
    output_gap: float
    outputs_compared: bool
    mixing: tuple[float, int] | None
    has_group_ids: bool
    has_metric: bool
    has_eval: bool
    measured: dict[str, dict[str, bool]]
    buffers: dict[str, str]
    metric_rows: dict[MetricKey, list[float]]
    metrics: dict[MetricKey, float | None]
    num_samples: int
    batch_size: int


def _compare_all(ctx: Context, train_data: Iterable[Any], eval_data: Iterable[Any] | None,
                 show: bool) -> tuple[Measured, Measured]:
    """The comparison passes over train_data (and eval_data)."""
    ema, pop, domain, training = (Behaviour.EMA, Behaviour.POPULATION, Behaviour.DOMAIN,
                                  Behaviour.TRAINING)
    on_train = compare(ctx, train_data, Data.TRAIN, [ema, pop, training]
                       if eval_data is None and ctx.metric else [pop, training], show)
    on_eval = on_train if eval_data is None else compare(
        ctx, eval_data, Data.EVAL, [ema, pop, domain] if ctx.metric else [ema], show)
    return on_train, on_eval


def measure(ctx: Context, train_data: Iterable[Any], eval_data: Iterable[Any] | None,
            group_ids: Any, show: bool) -> Numbers:
    """Run the statistics passes and the comparisons (the model exactly as before afterwards,
    however they end) and collect their numbers, the same on every rank."""
    guard = ctx.guard()
    try:
        s = _statistics(ctx, train_data, eval_data, group_ids)
        on_train, on_eval = _compare_all(ctx, train_data, eval_data, show)
    finally:
        guard.restore()
    group = ctx.options.process_group
    # every rank's first batch, so that every rank states the same sizes
    local, me = s.first[0] if s.first else on_train.first_batch, rank(group)
    sizes = [int(v) for v in all_sum([float(local if r == me else 0)
                                      for r in range(world_size(group))], group)]
    table = {name: _row(ctx, name, s, on_train, on_eval, sizes) for name in ctx.layers}
    return _numbers(ctx, s, on_train, on_eval, table, per_device_batch(sizes),
                    eval_data is not None, group_ids is not None)


def _numbers(ctx: Context, s: _Statistics, on_train: Measured, on_eval: Measured,
             table: dict[str, LayerDiagnosis], batch: int, has_eval: bool, has_ids: bool
             ) -> Numbers:
    unshuffled = [r.norm_batch_size for n, r in table.items()
                  if r.norm_batch_size is not None and n not in ctx.shuffled]
    k = min(unshuffled, default=None)
    ratio = group_mixing(s.ids, k) if k is not None and has_ids else None
    mixing = None if ratio is None or k is None else (ratio, k)
    out_gap = math.sqrt(on_train.out_diff / on_train.out_ref) if on_train.out_ref else math.nan
    data = Data.EVAL if has_eval else Data.TRAIN
    pairs = {"ema": on_eval.paired(MetricKey(data, Behaviour.POPULATION),
                                   MetricKey(data, Behaviour.EMA)),
             "train-test": on_train.paired(MetricKey(Data.TRAIN, Behaviour.TRAINING),
                                           MetricKey(Data.TRAIN, Behaviour.POPULATION)),
             "domain": on_eval.paired(MetricKey(Data.EVAL, Behaviour.DOMAIN),
                                      MetricKey(Data.EVAL, Behaviour.POPULATION))}
    rows = {**on_train.per_batch, **on_eval.per_batch}
    frozen = {n: (r.mean_shift, r.std_log_ratio) for n, r in s.report.layers.items()
              if is_fixed(ctx.layers[n], ctx.train_modes[n])}
    measured = {n: {"ema": n in s.report.layers, "train-test": bool(on_train.gap.get(n, [0, 0])[1]),
                    "domain": s.eval_report is not None and n in s.eval_report.layers}
                for n in table}
    return Numbers(
        table, dict(ctx.shuffled), {n for n in table if n not in s.ema}, frozen,
        dict(on_eval.calls), set(on_eval.batch_stats_in_eval), pairs, out_gap,
        bool(on_train.out_ref or on_train.out_diff), mixing,
        has_ids, ctx.metric is not None, has_eval, measured,
        {n: _nonfinite_buffers(s.ema.get(n)) for n in table},
        {key: [v for _, v in r] for key, r in rows.items()},
        {key: on_eval.mean(key) if key in on_eval.per_batch else on_train.mean(key)
         for key in rows},
        s.report.num_samples or on_train.samples, batch)
