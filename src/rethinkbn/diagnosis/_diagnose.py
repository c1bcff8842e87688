"""The entry point :func:`diagnose`: check the arguments, then measure, judge and report."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from .._checks import in_context
from .._model import rank, unwrap
from ..population import PreciseBNOptions
from ..population.options import options_from, with_options
from ._compare import MetricFn
from ._judge import judge
from ._measure import context, measure
from ._records import Thresholds
from ._report import Diagnosis

__all__ = ["DEFAULT_NUM_SAMPLES", "diagnose"]

DEFAULT_NUM_SAMPLES = 2048
"""diagnose's statistics budget when neither ``num_samples`` nor ``num_batches`` is given."""


def _checked(model: object, train_data: object, eval_data: object, metric: object,
             group_ids: object, thresholds: object) -> None:
    """TypeError, before anything runs, for arguments of the wrong kind."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose: model must be an nn.Module, got {type(model).__name__}")
    for label, fn in (("metric", metric), ("group_ids", group_ids)):
        if fn is not None and not callable(fn):
            raise TypeError(f"diagnose: {label} must be callable, got {type(fn).__name__}")
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        raise TypeError("diagnose: thresholds must be a rethinkbn.diagnosis.Thresholds, got "
                        f"{type(thresholds).__name__}")
    for label, data in (("train_data", train_data), ("eval_data", eval_data)):
        if data is not None and iter(data) is data:  # type: ignore[call-overload]
            raise TypeError(f"diagnose: {label} is a one-shot iterator "
                            f"({type(data).__name__}); it is read twice, pass a re-iterable "
                            "(a DataLoader, a list of batches)")


@with_options()
@in_context("diagnose")
def diagnose(
    model: nn.Module,
    train_data: Iterable[Any],
    eval_data: Iterable[Any] | None = None,
    options: PreciseBNOptions | None = None,
    *,
    metric: MetricFn | None = None,
    group_ids: Callable[[Any], Tensor] | None = None,
    thresholds: Thresholds | None = None,
    **kwargs: Any,
) -> Diagnosis:
    """Measure the paper's BatchNorm pitfalls on ``model`` (see :mod:`rethinkbn.diagnosis`).

    Args:
        train_data: batches as the model is trained on them (the first batch's size is taken as
            the per-device training batch), re-iterable (read twice: a DataLoader or a list,
            not a generator), in :func:`precise_bn`'s batch convention.
        eval_data: optional evaluation batches, of the training domain or another one.
        options: the statistics passes' :class:`PreciseBNOptions` (keywords override its
            fields, as for :func:`precise_bn`); diagnose's default budget is
            ``num_samples=2048``, the comparisons run on half of it (same unit), and
            ``include_frozen`` is always on (frozen statistics are compared with the data's).
        metric: ``metric(outputs, batch)`` -> the batch's mean metric, higher is better (e.g.
            accuracy); a difference counts when it exceeds ``thresholds.metric`` and twice its
            standard error over the batches.
        group_ids: ``group_ids(batch)`` -> one id per sample (e.g. the video or image a sample
            comes from), to check that samples normalized together are not correlated.

    Cost, in no-grad forwards of ``N`` (the budget) samples: the population statistics of
    ``train_data`` (N), then on N/2 eval mode and training behaviour (N; plus N/2 with the EMA
    when there is a ``metric`` and no ``eval_data``). ``eval_data`` adds its statistics (N) and,
    on N/2, eval mode with the EMA, training-domain and eval-domain statistics (3N/2 with a
    ``metric``, N/2 without); ``benchmarks/bench_diagnose.py`` measures it.

    Raises TypeError / ValueError for bad arguments (before anything runs), a model without
    BatchNorm, or a comparison pass that saw no sample. Side effects: none; buffers, modes,
    hooks and shuffle steps are restored in ``finally``. Under torch.distributed every rank
    calls it and returns the same diagnosis; progress shows on rank 0 only.
    """
    _checked(model, train_data, eval_data, metric, group_ids, thresholds)
    opts = options_from(options, kwargs)
    if opts.num_samples is None and opts.num_batches is None:
        opts = replace(opts, num_samples=DEFAULT_NUM_SAMPLES)
    show = (sys.stderr.isatty() if opts.progress is None else opts.progress) \
        and rank(opts.process_group) == 0
    model = unwrap(model)  # precise_bn's names: no DDP or torch.compile prefix
    ctx = context(model, replace(opts, include_frozen=True, progress=show), metric)
    numbers = measure(ctx, train_data, eval_data, group_ids, show)
    t = thresholds or Thresholds()
    return Diagnosis(judge(numbers, t), numbers.layers, numbers.metrics, numbers.output_gap,
                     numbers.num_samples, numbers.batch_size, t)
