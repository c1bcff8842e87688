"""The statistics pass shared by precise_bn, recompute_stats and ema_report.

One pass runs the model without gradients over a budget of batches while every BatchNorm layer
normalizes with batch statistics, and records the float64 moments of every call of every layer.
Three ways of reading a call's moments, cheapest first:

- ``"buffers"`` (torch BatchNorm): momentum is 1.0 during the pass, so after each call the running
  buffers hold that batch's mean and unbiased variance; a forward hook copies them (two C-vectors,
  no extra pass over the activations) and turns them into moments with ``m2 = var * (n - 1)``.
- ``"observer"`` (the rethinkbn layer family): the layer hands its own float64 moments to
  ``layer.observer``.
- ``"input"`` (FrozenBatchNorm when asked, torch SyncBatchNorm across several ranks): a
  forward-pre-hook computes ``Moments.of(input)``.

The model is restored exactly when the pass ends, however it ends; installing anything is the
caller's business.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._model import (
    FirstCall,
    ModelGuard,
    num_samples,
    running_buffers,
    select_input,
    to_device,
    unwrap,
    world_size,
)
from ..layers.base import BatchNormBase
from ..stats import Moments, all_gather_moments
from ._ranks import OK, PROBLEM, RAISED, agree
from ._state import (
    is_frozen,
    name_torch_errors,
    pass_layers,
    skip_empty_calls,
    syncs_across_ranks,
    use_local_batch_stats,
    use_norm_batch_size,
)
from .options import ForwardFn, PreciseBNOptions

__all__ = ["PassResult", "run_pass"]

logger = logging.getLogger(__name__)



@dataclass
class _Recorder:
    """The per-call moments of one layer, kept as rows to be stacked once at the end."""

    name: str
    layer: nn.Module
    rows: list[Moments] = field(default_factory=list)
    # "buffers" mode keeps the raw read-back (count, mean, unbiased var) and converts at the end.
    raw: list[tuple[int, Tensor, Tensor]] = field(default_factory=list)

    samples: int = 0

    def count_samples(self, _layer: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.dim() > 0:
            self.samples += int(x.size(0))

    def observe(self, _layer: nn.Module, moments: Moments) -> None:
        self.rows.append(moments)

    def read_input(self, _layer: nn.Module, args: tuple[Any, ...]) -> None:
        self.rows.append(Moments.of(args[0]))

    def read_buffers(self, layer: nn.Module, _args: tuple[Any, ...], output: Tensor) -> None:
        n = output.numel() // max(output.size(1), 1)
        if n == 0:
            # torch leaves its buffers alone on an empty batch: they still hold the last call's
            return
        mean, var = running_buffers(layer)  # type: ignore[misc]
        self.raw.append((n, mean.clone(), var.clone()))

    def per_call(self) -> Moments | None:
        """All calls as one Moments with a leading call dim, or None when never called."""
        if self.raw:
            mean = torch.stack([m for _, m, _ in self.raw]).double()
            var = torch.stack([v for _, _, v in self.raw]).double()
            counts = torch.tensor([n for n, _, _ in self.raw], dtype=torch.float64)
            return Moments.from_var_mean(counts.to(mean.device)[:, None], mean, var, unbiased=True)
        if not self.rows:
            return None
        return Moments(*(torch.stack([getattr(r, f) for r in self.rows]) for f in FIELDS))


FIELDS = ("count", "mean", "m2")


@dataclass
class PassResult:
    """What one statistics pass saw.

    ``calls[name]`` holds the moments of every call of layer ``name`` with a leading call dim
    (rank-local); ``totals[name]`` their exact merge, reduced across ranks when distributed.
    Layers never called have no entry in ``calls`` and zero counts in ``totals``.
    ``samples[name]`` counts the samples (dim 0 of the layer's inputs, over every call) the layer
    saw; it, ``num_samples`` and ``num_batches`` are summed over the ranks when distributed.
    ``warnings``: messages for the entry point to emit (a short ``data``, layers never called).
    """

    layers: dict[str, nn.Module]
    calls: dict[str, Moments]
    totals: dict[str, Moments]
    num_samples: int
    num_batches: int
    samples: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def default_forward(input_key: Any = None) -> ForwardFn:
    """``model(select_input(batch, input_key))``: the forward of a pass without ``forward=``."""

    def forward(model: nn.Module, batch: Any) -> Any:
        return model(select_input(batch, input_key))

    return forward


def _arm(
    guard: ModelGuard, name: str, layer: nn.Module, pass_nbs: int | None, first: FirstCall
) -> _Recorder:
    """Put one layer in pass mode (recorded in ``guard``) and hook its recorder and sample count."""
    rec = _arm_statistics(guard, name, layer, pass_nbs)
    guard.hook(layer.register_forward_pre_hook(rec.count_samples))
    guard.hook(layer.register_forward_pre_hook(first.hook))
    return rec


def _arm_statistics(
    guard: ModelGuard, name: str, layer: nn.Module, pass_nbs: int | None
) -> _Recorder:
    """Put one layer in pass mode (recorded in ``guard``) and hook its statistics recorder."""
    guard.set_attr(layer, "_rethinkbn_name", name)
    mean, var = running_buffers(layer)  # type: ignore[misc]
    if is_frozen(layer):
        rec = _Recorder(name, layer)
        guard.hook(layer.register_forward_pre_hook(rec.read_input))
        return rec
    tracked = getattr(layer, "num_batches_tracked", None)
    # the family's NaN counter too: the pass's batches are no training events
    events = getattr(layer, "nonfinite_count", None)
    guard.keep_values([t for t in (mean, var, tracked, events) if isinstance(t, Tensor)])
    # Each rank's moments stay local until the one reduction at the end.
    syncs = syncs_across_ranks(layer)
    if syncs:
        use_local_batch_stats(guard, layer)
    else:
        layer.training = True
    if not isinstance(layer, BatchNormBase):
        name_torch_errors(guard, layer)
    if isinstance(layer, BatchNormBase):
        rec = _Recorder(name, layer)
        guard.set_attr(layer, "observer", rec.observe)
        skip_empty_calls(guard, layer)
        use_norm_batch_size(guard, layer, pass_nbs)
        return rec
    if syncs:
        rec = _Recorder(name, layer)
        guard.hook(layer.register_forward_pre_hook(rec.read_input))
        return rec
    rec = _Recorder(name, layer)
    guard.set_attr(layer, "momentum", 1.0)
    guard.set_attr(layer, "track_running_stats", True)
    with torch.no_grad():
        # momentum 1 computes 0 * old + 1 * batch: a NaN already in the buffer would survive it.
        mean.zero_()
        var.fill_(1.0)
    guard.hook(layer.register_forward_hook(rec.read_buffers))
    return rec


def _check_grouping(layers: list[tuple[str, nn.Module]], pass_nbs: int | None) -> None:
    """``pass_norm_batch_size`` needs a layer that normalizes in groups; else it means nothing."""
    if pass_nbs is None or any(
        hasattr(layer, "norm_batch_size") or hasattr(layer, "num_devices")
        for _, layer in layers if not is_frozen(layer)
    ):
        return
    kinds = sorted({type(layer).__name__ for _, layer in layers}) or ["none"]
    raise ValueError(
        f"pass_norm_batch_size={pass_nbs} but no layer of the pass normalizes in groups "
        f"(its BatchNorm layers are {kinds}); expected a GhostBatchNorm, or pass "
        "pass_norm_batch_size=None"
    )


def run_pass(
    model: nn.Module, data: Iterable[Any], options: PreciseBNOptions, *, label: str = "pass"
) -> PassResult:
    """Run the statistics pass (see the module docstring); the model is restored when it returns.

    ``label`` titles the progress bar and the log line (the entry point's name); errors do not
    carry it (the entry point adds its name to them).

    Raises ValueError for an empty ``data`` (or a short one with ``strict=True``). In a
    distributed run every rank raises together, within ``options.timeout``: the ranks exchange
    their status (and a fingerprint of their layers) before the one reduction (see
    :mod:`._ranks` for which exception a rank that never arrives raises). Warnings (a short
    ``data``, a layer never called, no layer to estimate) are returned in
    :attr:`PassResult.warnings`, for the entry point to emit at its caller's line.
    """
    model = unwrap(model)
    layers = pass_layers(model, options.include_frozen)
    _check_grouping(layers, options.pass_norm_batch_size)
    distributed = world_size(options.process_group) > 1
    if not layers and not distributed:
        return PassResult({}, {}, {}, 0, 0, warnings=[
            f"{type(model).__name__} has no BatchNorm layer with running statistics to "
            "estimate; nothing was run"])
    recorders, seen = _guarded_pass(model, data, layers, options, distributed, label)
    problem, warned = _data_problem(*seen, options, distributed)
    if distributed:
        short = agree(layers, PROBLEM if problem else OK, problem or "",
                      options.process_group, options.timeout_seconds)
        if problem is not None:
            raise ValueError(problem)
        if short:
            raise ValueError(f"{len(short)} other rank(s) {short} had an empty or short data "
                             "loader; every rank's model is unchanged")
        if not layers:
            return PassResult({}, {}, {}, 0, 0, warnings=warned)
    elif problem is not None:
        raise ValueError(problem)
    result = _collect(layers, recorders, seen, options, warned)
    logger.info("%s: %d samples in %d batches, %d BatchNorm layers", label, result.num_samples,
                result.num_batches, len(layers))
    return result


def _guarded_pass(
    model: nn.Module,
    data: Iterable[Any],
    layers: list[tuple[str, nn.Module]],
    options: PreciseBNOptions,
    distributed: bool,
    label: str,
) -> tuple[list[_Recorder], tuple[int, int]]:
    """Arm every layer, run the batches, restore the model: the recorders and (samples,
    batches) seen. An exception on one rank is announced to the others before it propagates."""
    guard = ModelGuard(model)
    first = FirstCall()
    try:
        if not options.keep_modes:
            for module in model.modules():
                module.training = False
        recorders = [_arm(guard, name, layer, options.pass_norm_batch_size, first)
                     for name, layer in layers]
        unit, budget = options.budget
        show = sys.stderr.isatty() if options.progress is None else options.progress
        with tqdm(total=budget, unit=unit[:-1], desc=label, disable=not show,
                  leave=False) as bar:
            seen = _iterate(model, data, options, bar, first)
    except BaseException as error:
        if distributed:
            guard.restore()
            # tell the other ranks, so that they stop now; this rank's own error wins
            with contextlib.suppress(Exception):
                agree(layers, RAISED, f"{type(error).__name__}: {error}", options.process_group,
                      options.timeout_seconds)
        raise
    finally:
        guard.restore()
    return recorders, seen


def _data_problem(
    seen_samples: int, seen_batches: int, options: PreciseBNOptions, distributed: bool
) -> tuple[str | None, list[str]]:
    """What is wrong with the data this rank saw (None: nothing), and what to warn about."""
    unit, budget = options.budget
    if seen_batches == 0:  # an empty loader: a mistake on any rank
        return f"data yielded no batches; expected up to {budget} {unit}", []
    if seen_samples == 0 and not distributed:
        return (f"data yielded {seen_batches} batches, all empty (0 samples); expected up to "
                f"{budget} {unit}"), []
    # across ranks the estimate is the union's: a shard of empty batches fails only if every
    # rank's does (checked after the reduction, on the summed counts)
    if (seen_samples if unit == "samples" else seen_batches) >= budget:
        return None, []
    message = (f"data ended after {seen_batches} batches ({seen_samples} samples), short of the "
               f"budget of {budget} {unit}")
    return (message + " (strict=True)", []) if options.strict else (None, [message])


def _collect(
    layers: list[tuple[str, nn.Module]],
    recorders: list[_Recorder],
    seen: tuple[int, int],
    options: PreciseBNOptions,
    warned: list[str],
) -> PassResult:
    """Merge the recorders' moments and counts (across ranks: one collective) into the result."""
    calls = {rec.name: rows for rec in recorders if (rows := rec.per_call()) is not None}
    group = options.process_group
    totals, counts = _reduce(layers, calls, [*seen, *(rec.samples for rec in recorders)], group)
    seen_samples, seen_batches = counts[0], counts[1]
    if seen_samples == 0:  # the same sums on every rank: every rank raises
        unit, budget = options.budget
        raise ValueError(
            f"the data of all {world_size(group)} ranks held no samples ({seen_batches} batches "
            f"in all); expected up to {budget} {unit} per rank"
        )
    samples = {rec.name: n for rec, n in zip(recorders, counts[2:], strict=True)}
    # a layer not called here may have seen the samples of other ranks
    warned += [f"layer '{name}' was never called during the pass; its statistics are left "
               "unchanged" for name in sorted(totals.keys() - calls.keys())
               if samples.get(name, 0) == 0]
    return PassResult(dict(layers), calls, totals, seen_samples, seen_batches, samples, warned)


def _iterate(
    model: nn.Module, data: Iterable[Any], options: PreciseBNOptions, bar: tqdm[Any],
    first: FirstCall,
) -> tuple[int, int]:
    """Run the forward over whole batches until the budget is met or ``data`` ends.

    A batch's samples are dim 0 of its model input (or first tensor); for a batch holding no
    tensor to read (an object given with ``forward=``), dim 0 of the input of the first
    BatchNorm call of its forward (``first``): the kernel's batch convention
    (:mod:`rethinkbn._model`).
    """
    unit, budget = options.budget
    input_key, device = options.input_key, options.device
    forward = options.forward or default_forward(input_key)
    seen_samples = seen_batches = 0
    with torch.no_grad():
        iterator = iter(data)
        while (seen_samples if unit == "samples" else seen_batches) < budget:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            batch = to_device(batch, device)
            try:
                n: int | None = num_samples(batch, input_key)
                unknown = None
            except TypeError as error:
                n, unknown = None, error
            first.samples = None
            forward(model, batch)
            if n is None:
                if first.samples is None:
                    raise TypeError(f"{unknown}, and no BatchNorm layer of the pass saw a tensor "
                                    "input in its forward") from None
                n = first.samples
            seen_samples += n
            seen_batches += 1
            bar.update(n if unit == "samples" else 1)
    return seen_samples, seen_batches


def _reduce(
    layers: list[tuple[str, nn.Module]],
    calls: dict[str, Moments],
    counters: list[int],
    group: dist.ProcessGroup | None,
) -> tuple[dict[str, Moments], list[int]]:
    """Merge each layer's calls, then all layers across ranks in one collective.

    The ``counters`` (samples, batches, per-layer samples) travel in the same collective, as the
    counts of one extra set of moments (counts add up when moments merge). Returns the merged
    moments and the counters summed over the ranks.
    """
    totals = []
    for name, layer in layers:
        if name in calls:
            totals.append(calls[name].total())
        else:
            mean = running_buffers(layer)[0]  # type: ignore[index]
            totals.append(Moments.zeros(mean.shape, device=mean.device))
    device = totals[0].mean.device
    extra = Moments.zeros(len(counters), device=device)
    counts = torch.tensor(counters, dtype=extra.count.dtype, device=device)
    reduced = all_gather_moments([*totals, Moments(counts, extra.mean, extra.m2)], group)
    summed = [int(c) for c in reduced[-1].count.tolist()]
    return {name: m for (name, _), m in zip(layers, reduced[:-1], strict=True)}, summed
