"""The comparison passes of a diagnosis: the same batches in eval mode with several sets of
statistics and in training behaviour, with what each forward shows recorded.

Every forward runs under a :class:`~rethinkbn._model.ModelGuard` that puts back every buffer's
values and every ShuffledModule's step (a training forward moves both) and removes its hooks;
the batches follow the package's one batch convention (:mod:`rethinkbn._model`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._model import FirstCall, ModelGuard, first_tensor, select_input, to_device, world_size
from .._model import num_samples as samples_in
from ..distributed import ShuffledModule
from ..layers import FrozenBatchNorm
from ..population import PreciseBNOptions, StatsBank
from ..stats import Moments, centered, compute_dtype, split_mean
from ._records import Behaviour, Data, MetricKey

__all__ = ["Context", "Measured", "all_sum", "compare", "counted_run", "is_fixed",
           "share_moments"]

MetricFn = Callable[[Any, Any], "float | Tensor"]
MIN_WEIGHT = 1e-6
"""Channels whose affine ``|weight|`` is at most this are left out of the train/test gap: the
gap un-affines the output, ``(y - bias) / weight``, and a (near) zero weight would divide the
rounding noise of ``y`` up into a gap that the layer's output does not have."""
BANK_NAMES = {Behaviour.POPULATION: "population", Behaviour.DOMAIN: "eval domain"}


def is_fixed(layer: nn.Module, trains: bool) -> bool:
    """Whether the layer normalizes with fixed statistics in training (FrozenBN or eval mode)."""
    return isinstance(layer, FrozenBatchNorm) or not trains


@dataclass
class Context:
    """What every pass of a diagnosis needs: the (unwrapped) model, its BatchNorm layers by
    qualified name and their modes in training, the shuffles it trains with, the statistics
    pass's options and the metric; ``bank`` collects the statistics the passes compare."""

    model: nn.Module
    layers: dict[str, nn.Module]
    train_modes: dict[str, bool]
    shufflers: dict[str, tuple[ShuffledModule, bool]]
    shuffled: dict[str, str]
    options: PreciseBNOptions
    metric: MetricFn | None
    bank: StatsBank = field(default_factory=StatsBank)

    def run(self, batch: Any) -> Any:
        """One forward of ``batch``: ``forward(model, batch)``, else ``model(model input)``."""
        if self.options.forward is not None:
            return self.options.forward(self.model, batch)
        return self.model(select_input(batch, self.options.input_key))

    @property
    def budget(self) -> tuple[str, int]:
        """The comparisons' budget: half the statistics pass's, in the same unit."""
        unit, n = self.options.budget
        return unit, max(n // 2, 1)

    def guard(self) -> ModelGuard:
        """A guard over one forward: buffers' values, shuffle steps and modes come back."""
        guard = ModelGuard(self.model)
        guard.keep_values(list(self.model.buffers()))
        for shuffler, _ in self.shufflers.values():
            guard.set_attr(shuffler, "step", shuffler.step)
        return guard


def all_sum(values: list[float], group: dist.ProcessGroup | None) -> list[float]:
    """``values`` summed over the ranks of ``group`` (themselves outside torch.distributed)."""
    if world_size(group) == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.tolist()


def counted_run(ctx: Context, batch: Any) -> tuple[int, Any]:
    """``ctx.run(batch)`` and the batch's size; for a batch of unknown size (an object given with
    ``forward=``), dim 0 of the input of the first BatchNorm call of that forward, as the
    statistics pass counts such batches."""
    try:
        return samples_in(batch, ctx.options.input_key), ctx.run(batch)
    except TypeError as error:
        unknown = error
    first, guard = FirstCall(), ModelGuard(ctx.model)
    try:
        for layer in ctx.layers.values():
            guard.hook(layer.register_forward_pre_hook(first.hook))
        out = ctx.run(batch)
    finally:
        guard.restore()
    if first.samples is None:
        raise TypeError(f"{unknown}, and no BatchNorm layer saw a tensor input in its forward")
    return first.samples, out


def _samples(ctx: Context, batch: Any) -> int:
    """The size of ``batch`` before any forward of a comparison: for a batch of unknown size, an
    eval-mode forward without gradients counts it (modes and buffers as they were after it)."""
    try:
        return samples_in(batch, ctx.options.input_key)
    except TypeError:
        pass
    guard = ctx.guard()
    try:
        ctx.model.eval()
        with torch.no_grad():
            return counted_run(ctx, batch)[0]
    finally:
        guard.restore()


@dataclass
class Measured:
    """What a comparison pass saw; rank-local until :meth:`merged`.

    ``shares[name]`` lists, per call, the moments of all values and of the per-sample means of
    the layer's input (in eval mode with population statistics, on ``train_data``), merged once
    by :meth:`share`.
    """

    per_batch: dict[MetricKey, list[tuple[int, float]]] = field(default_factory=dict)
    samples: int = 0
    batches: int = 0
    skipped: int = 0  # samples of batches left out: some rank's batch was too small to train on
    first_batch: int = 0  # this rank's first batch size (rank-local, not merged)
    out_diff: float = 0.0
    out_ref: float = 0.0
    gap: dict[str, list[float]] = field(default_factory=dict)  # name -> [sum of squares, count]
    calls: dict[str, int] = field(default_factory=dict)  # most calls in one forward
    batch_stats_in_eval: set[str] = field(default_factory=set)
    shares: dict[str, list[tuple[Moments, Moments]]] = field(default_factory=dict)

    def share(self, name: str) -> tuple[Moments, Moments] | None:
        """The layer's two sets of moments over every call (None: never measured)."""
        rows = self.shares.get(name)
        if not rows:
            return None
        return _merged([t for t, _ in rows]), _merged([b for _, b in rows])

    def merged(self, group: dist.ProcessGroup | None) -> Measured:
        """The union over the ranks (every rank gets the same)."""
        if world_size(group) == 1:
            return self
        parts: list[Any] = [None] * world_size(group)
        dist.all_gather_object(parts, self, group=group)
        out = Measured(first_batch=self.first_batch)
        for p in parts:
            for key, rows in p.per_batch.items():
                out.per_batch.setdefault(key, []).extend(rows)
            out.samples += p.samples
            out.batches += p.batches
            out.skipped += p.skipped
            out.out_diff += p.out_diff
            out.out_ref += p.out_ref
            for name, (sq, n) in p.gap.items():
                row = out.gap.setdefault(name, [0.0, 0.0])
                row[0] += sq
                row[1] += n
            for name, k in p.calls.items():
                out.calls[name] = max(out.calls.get(name, 0), k)
            out.batch_stats_in_eval |= p.batch_stats_in_eval
            for name, rows in p.shares.items():
                out.shares.setdefault(name, []).extend(rows)
        return out

    def mean(self, key: MetricKey) -> float | None:
        rows = self.per_batch.get(key)
        if not rows:
            return None
        return sum(n * v for n, v in rows) / sum(n for n, _ in rows)

    def paired(self, a: MetricKey, b: MetricKey) -> tuple[float, float] | None:
        """``(mean of metric[a] - metric[b], its standard error)`` over the batches both ran."""
        rows_a, rows_b = self.per_batch.get(a, []), self.per_batch.get(b, [])
        if not rows_a or len(rows_a) != len(rows_b) or not all(
                math.isfinite(v) for _, v in rows_a + rows_b):
            return None  # a non-finite metric is a finding of its own
        n = torch.tensor([k for k, _ in rows_a], dtype=torch.float64)
        d = torch.tensor([va - vb for (_, va), (_, vb) in zip(rows_a, rows_b, strict=True)],
                         dtype=torch.float64)
        delta = float((n * d).sum() / n.sum())
        if len(rows_a) < 2:  # no spread to judge a difference by
            return delta, math.inf
        # the sample-weighted mean's standard error, from the spread of the batches' differences
        se = float(((n * (d - delta)).square().sum()).sqrt() / n.sum())
        return delta, se


def _merged(rows: list[Moments]) -> Moments:
    """The exact merge of moments of one shape, in one vectorized step."""
    return Moments(*(torch.stack([getattr(r, f) for r in rows]) for f in ("count", "mean", "m2"))
                   ).total()


# ---------------------------------------------------------------------------- hooks
def _gap_hook(name: str, layer: nn.Module, pop: Mapping[str, Tensor], acc: Measured) -> Any:
    """A forward hook measuring ``z_train - z_pop`` for one layer in training behaviour.

    With ``z_train = (y - bias) / weight`` (the layer's output, un-affined) and
    ``z_pop = (x - mu) / sigma`` (``sigma = sqrt(var + eps)``), the difference is one fused
    ``y * a - x * c + d`` per channel; channels with ``|weight| <=`` :data:`MIN_WEIGHT` are
    left out.
    """
    c = (pop["running_var"].double() + float(getattr(layer, "eps", 1e-5))).rsqrt()
    mu = pop["running_mean"].double()

    def hook(_m: nn.Module, args: tuple[Any, ...], y: Any) -> None:
        x = args[0] if args else None
        if not (isinstance(x, Tensor) and isinstance(y, Tensor) and x.shape == y.shape
                and x.dim() >= 2 and x.size(1) == c.numel()):
            return
        weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
        w = weight.detach().double() if isinstance(weight, Tensor) else torch.ones_like(c)
        b = bias.detach().double() if isinstance(bias, Tensor) else torch.zeros_like(c)
        keep = w.abs() > MIN_WEIGHT
        a = torch.where(keep, 1 / w.where(keep, torch.ones_like(w)), torch.zeros_like(w))
        d = torch.where(keep, mu * c - b * a, torch.zeros_like(c))
        cc = torch.where(keep, c, torch.zeros_like(c))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dtype = torch.promote_types(x.dtype, torch.float32)
        diff = torch.addcmul(y.to(dtype) * a.to(dtype).view(shape), x.to(dtype),
                             cc.to(dtype).view(shape), value=-1) + d.to(dtype).view(shape)
        row = acc.gap.setdefault(name, [0.0, 0.0])
        row[0] += float(diff.square().sum(dtype=torch.float64))
        row[1] += x.numel() // x.size(1) * int(keep.sum())

    return hook


def share_moments(x: Tensor) -> tuple[Moments, Moments]:
    """``(moments of all values, moments of the per-sample means)`` of an ``(N, C, ...)`` input,
    per channel, in float64, the two variances of the between-sample share.

    With ``L`` values per sample and channel, per-sample means ``m_i`` (summed in float64) and
    within-sample sums of squares ``w_i = sum_j (x_ij - m_i)^2`` (deviations in the compute
    dtype, from the float64 mean split in two parts as :func:`rethinkbn.stats.centered` does,
    so a large mean costs the spread no digits), the law of total variance gives the total's
    ``m2 = sum_i w_i + L * m2(m)``: no float64 copy of the values.
    """
    flat = x.detach().reshape(x.size(0), x.size(1), -1)
    length = flat.size(-1)
    means = flat.mean(-1, dtype=torch.float64)  # (N, C)
    deviations = centered(flat, *split_mean(means, compute_dtype(flat)))
    within = deviations.square_().sum(-1, dtype=torch.float64)
    between = Moments.of(means)
    return Moments(between.count * length, between.mean,
                   within.sum(0) + length * between.m2), between


def _share_hook(name: str, acc: Measured) -> Any:
    """A forward pre-hook adding the moments of the layer's input for the between-sample
    share (:func:`share_moments`)."""

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.dim() >= 2 and x.size(0) > 0:
            acc.shares.setdefault(name, []).append(share_moments(x))

    return hook


def _call_counter(name: str, calls: dict[str, int], acc: Measured) -> Any:
    """A forward pre-hook counting the layer's calls and noting batch statistics in eval mode."""

    def hook(layer: nn.Module, _args: Any) -> None:
        calls[name] = calls.get(name, 0) + 1
        if layer.training or getattr(layer, "running_mean", None) is None:
            acc.batch_stats_in_eval.add(name)

    return hook


# ---------------------------------------------------------------------------- forwards
def _eval_forward(ctx: Context, config: Behaviour, batch: Any, acc: Measured, *, watch: bool,
                  share: bool) -> Any:
    """Eval mode with the statistics of ``config``; with ``watch``, the BatchNorm calls are
    counted and those that normalize with batch statistics noted; with ``share``, the
    between-sample share's moments of every layer's input are added."""
    calls: dict[str, int] = {}
    guard = ctx.guard()
    try:
        for name, layer in ctx.layers.items():
            if watch:
                guard.hook(layer.register_forward_pre_hook(_call_counter(name, calls, acc)))
            if share:
                guard.hook(layer.register_forward_pre_hook(_share_hook(name, acc)))
        for m in ctx.model.modules():
            m.training = False
        with torch.no_grad():
            if config not in BANK_NAMES:  # the EMA: the running statistics as they came in
                return ctx.run(batch)
            with ctx.bank.use(ctx.model, BANK_NAMES[config]):
                return ctx.run(batch)
    finally:
        guard.restore()
        for name, k in calls.items():
            acc.calls[name] = max(acc.calls.get(name, 0), k)


def _training_forward(ctx: Context, batch: Any, acc: Measured) -> Any:
    """The model's outputs as in training (BatchNorm layers in their training modes, a
    ShuffledModule shuffling as in training, dropout off), each layer's ``z_train - z_pop``
    recorded; running buffers and shuffle steps restored afterwards."""
    pop = ctx.bank["population"]
    guard = ctx.guard()
    try:
        for m in ctx.model.modules():
            m.training = False
        for shuffler, trains in ctx.shufflers.values():
            shuffler.training = trains
        for name, layer in ctx.layers.items():
            layer.training = ctx.train_modes[name]
            if name in pop and not is_fixed(layer, ctx.train_modes[name]) \
                    and pop[name]["running_mean"].dim() == 1:
                guard.hook(layer.register_forward_hook(_gap_hook(name, layer, pop[name], acc)))
        with torch.no_grad():
            return ctx.run(batch)
    finally:
        guard.restore()


def _metric_value(ctx: Context, out: Any, batch: Any, where: MetricKey) -> float:
    """``ctx.metric(out, batch)`` as a float; TypeError naming the metric for anything but a
    number or a one-element tensor."""
    value = ctx.metric(out, batch)  # type: ignore[misc]
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    name = getattr(ctx.metric, "__qualname__", None) or repr(ctx.metric)
    got = (f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor)
           else f"{value!r}" if value is None else f"a {type(value).__name__}")
    raise TypeError(f"diagnose: metric {name} returned {got} on a batch of {where}; expected the "
                    "batch's mean metric as a number (a float or a one-element tensor)")


def _run_configs(ctx: Context, batch: Any, n: int, data: Data, configs: list[Behaviour],
                 acc: Measured) -> None:
    """Every config of ``configs`` on one batch of ``n`` samples: its metric, the output gap of
    training behaviour against population statistics; the first config counts the calls."""
    ref = None
    for i, config in enumerate(configs):
        if config is Behaviour.TRAINING:
            out = _training_forward(ctx, batch, acc)
            got = first_tensor(out)
            if isinstance(ref, Tensor) and isinstance(got, Tensor) and got.shape == ref.shape:
                acc.out_diff += float((got.double() - ref.double()).square().sum())
                acc.out_ref += float(ref.double().square().sum())
        else:
            out = _eval_forward(ctx, config, batch, acc, watch=i == 0, share=(
                config is Behaviour.POPULATION and data is Data.TRAIN))
            if config is Behaviour.POPULATION:
                ref = first_tensor(out)
        if ctx.metric is not None:
            key = MetricKey(data, config)
            acc.per_batch.setdefault(key, []).append((n, _metric_value(ctx, out, batch, key)))


def _batches(ctx: Context, data: Iterable[Any], acc: Measured, trains: bool
             ) -> Iterator[tuple[Any, int]]:
    """``(batch, samples)`` until the comparisons' budget is met or some rank's data ends.

    Under torch.distributed the ranks decide together, per batch, whether to go on (every rank
    has a batch and some rank still needs one) and whether to run it (with training behaviour,
    every rank's batch holds 2 samples or more; else every rank leaves it out), so that their
    collectives (SyncBatchNorm's, a ShuffledModule's) always match.
    """
    group, (unit, budget) = ctx.options.process_group, ctx.budget
    iterator = iter(data)
    while True:
        needs = float((acc.samples if unit == "samples" else acc.batches) < budget)
        if world_size(group) == 1 and not needs:
            return
        batch = next(iterator, None)
        if batch is not None:
            batch = to_device(batch, ctx.options.device)
        n = 0 if batch is None else _samples(ctx, batch)
        acc.first_batch = acc.first_batch or n
        ended, small = float(batch is None), float(trains and batch is not None and n < 2)
        if world_size(group) > 1:  # ranks stop and skip together: training forwards are collective
            ended, small, needs = all_sum([ended, small, needs], group)
        if ended or not needs:
            return
        if small:  # torch's BatchNorm cannot train on one sample
            acc.skipped += n
            continue
        yield batch, n


def compare(ctx: Context, data: Iterable[Any], which: Data, configs: list[Behaviour],
            show: bool) -> Measured:
    """One pass over half the statistics budget of ``data``, running each of ``configs`` on every
    batch (metric per batch under ``MetricKey(which, config)``). The buffers are put back after
    every forward, the modes by the caller. Returns the union over the ranks.

    Raises ValueError, on every rank, when the pass ran no batch: ``data`` yielded nothing the
    second time (a one-shot stream) or only batches too small for training behaviour.
    """
    acc = Measured()
    unit, budget = ctx.budget
    label = which.value
    with tqdm(total=budget, unit=unit[:-1], desc=f"diagnose: {label}", disable=not show,
              leave=False) as bar:
        for batch, n in _batches(ctx, data, acc, Behaviour.TRAINING in configs):
            _run_configs(ctx, batch, n, which, configs, acc)
            acc.samples += n
            acc.batches += 1
            bar.update(n if unit == "samples" else 1)
    merged = acc.merged(ctx.options.process_group)
    if merged.samples == 0:
        why = (f"its {merged.skipped} samples came in batches of fewer than 2 samples (on some "
               "rank), too few to run training behaviour" if merged.skipped else
               f"{label} yielded no batch the second time it was read")
        raise ValueError(
            f"diagnose: the comparison pass over {label} saw 0 samples: {why}; {label} is read "
            "twice (the statistics, then the comparisons) and each pass needs at least one "
            "batch (of 2 samples or more for training behaviour): pass a re-iterable (a list of "
            "batches, a DataLoader over a map-style Dataset), not a one-shot stream")
    return merged
